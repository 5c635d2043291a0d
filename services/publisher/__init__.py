"""The Publisher service: publishes each profile's videos through its own Postiz organization,
exactly once per request."""
