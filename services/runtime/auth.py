"""Who may act for a profile: the authorizer AUTH_MODE chooses, and a command that mints tokens.

In `jwt` mode every call carries `authorization: Bearer <token>`, a JWT signed with HS256 (a
shared secret) or ES256 (verified with a public key) whose claims are `sub` (the calling
service or user), `profiles` (the profile ids it may act for), `exp`, and optionally
`scope: operator` (cross-profile reads only, see the server interceptor).

    python -m services.runtime.auth mint --sub ops --profiles store-1,store-2 --ttl 3600
"""

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
from grpc.aio import ServicerContext

from services.runtime.call_context import AUTHORIZATION_METADATA_KEY, Caller
from services.runtime.errors import PermissionDenied, Unauthenticated
from services.runtime.interceptors.server import Authorizer, allow_any_caller
from services.runtime.settings import Settings

OPERATOR_SCOPE = "operator"
_BEARER = "bearer "
_REQUIRED_CLAIMS = ["exp", "sub", "profiles"]
# Clock skew tolerated between the host that minted a token and the one checking it.
LEEWAY_SECONDS = 30


def _key_text(value: str) -> str:
    """PEM text as given, or the contents of the file it names."""
    return value if value.lstrip().startswith("-----BEGIN") else Path(value).read_text()


def _bearer_token(context: ServicerContext) -> tuple[str, str]:
    """The token and the whole metadata value it came in."""
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION_METADATA_KEY:
            if isinstance(value, str) and value[: len(_BEARER)].lower() == _BEARER:
                return value[len(_BEARER) :].strip(), value
            break
    raise Unauthenticated(
        "authorization metadata is required: 'Bearer <token>' "
        "(python -m services.runtime.auth mint)"
    )


class JwtAuthorizer:
    """Proves the caller with a signed JWT; one algorithm, chosen by the key it is given."""

    def __init__(self, key: str, algorithm: str) -> None:
        self._key = key
        self._algorithm = algorithm

    @classmethod
    def from_settings(cls, settings: Settings) -> "JwtAuthorizer":
        if settings.auth_jwt_secret:
            return cls(settings.auth_jwt_secret, "HS256")
        return cls(_key_text(settings.auth_jwt_public_key), "ES256")

    def claims(self, token: str) -> dict[str, Any]:
        """The verified claims; Unauthenticated saying what is wrong otherwise."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                leeway=LEEWAY_SECONDS,
                options={"require": _REQUIRED_CLAIMS, "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired; mint a new one") from None
        except jwt.InvalidTokenError as error:
            raise Unauthenticated(f"the token is not valid: {error}") from None
        profiles = claims["profiles"]
        if not isinstance(profiles, list) or not all(isinstance(p, str) for p in profiles):
            raise Unauthenticated("the token's profiles claim must be a list of profile ids")
        if not isinstance(claims["sub"], str) or not claims["sub"]:
            raise Unauthenticated("the token's sub claim must name the caller")
        return claims

    def __call__(self, profile_id: str | None, context: ServicerContext, method: str) -> Caller:
        token, authorization = _bearer_token(context)
        claims = self.claims(token)
        caller = Caller(
            subject=claims["sub"],
            operator=_has_operator_scope(claims.get("scope")),
            authorization=authorization,
        )
        if profile_id is not None and not caller.operator and profile_id not in claims["profiles"]:
            raise PermissionDenied(
                f"the token of {caller.subject} may not act for profile {profile_id}"
            )
        return caller


def _has_operator_scope(scope: Any) -> bool:
    """`scope` as one name or as OAuth's space-separated list."""
    return isinstance(scope, str) and OPERATOR_SCOPE in scope.split()


def authorizer_for(settings: Settings) -> Authorizer:
    """The authorizer AUTH_MODE names."""
    if settings.auth_mode == "jwt":
        return JwtAuthorizer.from_settings(settings)
    return allow_any_caller


def mint_token(
    key: str,
    *,
    sub: str,
    profiles: Sequence[str],
    ttl_seconds: float = 3600,
    operator: bool = False,
    algorithm: str = "HS256",
    extra_claims: dict[str, Any] | None = None,
) -> str:
    """A signed token: HS256 with a shared secret, ES256 with a private key (PEM)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": sub,
        "profiles": list(profiles),
        "iat": now,
        "exp": now + int(ttl_seconds),
    }
    if operator:
        claims["scope"] = OPERATOR_SCOPE
    return jwt.encode(claims | (extra_claims or {}), key, algorithm=algorithm)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m services.runtime.auth",
        description="Mints a token for AUTH_MODE=jwt (grpcurl: -H 'authorization: Bearer …').",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    mint = commands.add_parser("mint", help="print a signed token")
    mint.add_argument("--sub", required=True, help="the calling service or user")
    mint.add_argument("--profiles", default="", help="comma-separated profile ids")
    mint.add_argument("--ttl", type=float, default=3600, help="seconds until it expires")
    mint.add_argument("--operator", action="store_true", help="scope operator")
    mint.add_argument(
        "--private-key",
        default=os.environ.get("AUTH_JWT_PRIVATE_KEY", ""),
        help="ES256 private key, PEM or file path (default AUTH_JWT_PRIVATE_KEY); "
        "without it, HS256 with AUTH_JWT_SECRET",
    )
    args = parser.parse_args(argv)
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    if args.private_key:
        key, algorithm = _key_text(args.private_key), "ES256"
    else:
        key, algorithm = os.environ.get("AUTH_JWT_SECRET", ""), "HS256"
        if not key:
            sys.exit("set AUTH_JWT_SECRET (HS256) or give --private-key (ES256)")
    print(
        mint_token(
            key,
            sub=args.sub,
            profiles=profiles,
            ttl_seconds=args.ttl,
            operator=args.operator,
            algorithm=algorithm,
        )
    )


if __name__ == "__main__":
    main()
