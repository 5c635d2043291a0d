"""gRPC interceptors: the server's call pipeline and the client's profile propagation."""

from services.runtime.interceptors.client import ProfileClientInterceptor
from services.runtime.interceptors.server import ProfileInterceptor

__all__ = ["ProfileClientInterceptor", "ProfileInterceptor"]
