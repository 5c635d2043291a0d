"""gRPC interceptors: the server's call pipeline and the client's profile propagation."""

from services.runtime.interceptors.client import profile_client_interceptors
from services.runtime.interceptors.server import ProfileInterceptor

__all__ = ["ProfileInterceptor", "profile_client_interceptors"]
