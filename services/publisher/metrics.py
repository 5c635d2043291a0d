"""The Publisher's own Prometheus metrics (the runtime serves them with the gRPC ones)."""

from prometheus_client import Counter

POSTIZ_REQUESTS = Counter(
    "postiz_requests_total",
    "HTTP requests to Postiz by method, endpoint (first path segment) and outcome: the HTTP "
    "status; or, when no status came back, timeout (past the total limit), unreachable, busy "
    "(no free connection of the profile's pool), refused (not a public address), bad_answer "
    "(too large or compressed), cancelled or error.",
    ["method", "endpoint", "status"],
)
RATE_LIMIT_REFUSALS = Counter(
    "publisher_rate_limit_refusals_total",
    "Posts refused for a rate limit: postiz_429 (Postiz answered 429), postiz_wait (Postiz "
    "asked to wait earlier), posts_per_hour (the profile's own budget is spent).",
    ["reason"],
)
