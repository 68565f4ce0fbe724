"""The one error tree of the gateway, rendered in OpenAI's error shape.

    GatewayError             500  an unexpected failure (a bug), told in general terms
    ├── InvalidRequest       400  a field is missing, of the wrong type or out of range; not HTTP at all
    ├── Unauthorized         401  missing, unknown or revoked key (with www-authenticate)
    ├── NotFound             404  unknown route
    ├── ModelNotFound        404  a model the gateway does not serve
    ├── KeyMissing           404  no issued key of that name (admin API)
    ├── MethodNotAllowed     405  (with allow)
    ├── RequestTimeout       408  a request's line and headers did not arrive in time (http_guard)
    ├── Conflict             409  a key name in use, once revoked, or from the config file
    ├── PayloadTooLarge      413
    ├── RateLimited          429  too many failed authentications from one address (with retry-after)
    ├── HeadTooLarge         431  a request's line and headers, or its chunk framing, too large (http_guard)
    ├── UpstreamUnavailable  502  upstream unreachable, or it answered garbage
    ├── Overloaded           503  no room now (request bodies in memory, file descriptors, connections)
    ├── ShuttingDown         503  the server's shutdown grace ran out
    ├── UpstreamTimeout      504  no byte for read_timeout_s, or no whole answer by total_timeout_s
    └── FrameworkHttpError   any  another HTTP error of the web framework (an unreadable dashboard file)

Every error the gateway answers itself is one of these, rendered by `to_json()` (or `to_dict()`) with
the headers of `headers()`: on the chat path (asgi.send_error), on the FastAPI routes (app.py), for
requests that never reach the app (http_guard) and in the simulator. An error body relayed from
upstream is not one of these: it keeps upstream's own fields, completed to this shape.

Messages never carry a secret: they are written here or in the validator, never copied from an
exception of the HTTP client.
"""

from __future__ import annotations

from typing import ClassVar

import orjson


class GatewayError(Exception):
    status: int = 500  # each class's own; FrameworkHttpError's is the framework's, per instance
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        message = message.encode(
            "utf-8", "replace"
        ).decode()  # a lone surrogate from a body must not break JSON
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def to_dict(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The response headers this error's status calls for (none for most)."""
        return []


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"
    default_code = "invalid_value"


class Unauthorized(GatewayError):
    status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"www-authenticate", b"Bearer")]


class NotFound(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class KeyMissing(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "key_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"

    def __init__(self, message: str, *, allow: str = "POST") -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"allow", self.allow.encode("latin-1"))]


class RequestTimeout(GatewayError):
    status = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class Conflict(GatewayError):
    status = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(GatewayError):
    status = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = max(1, retry_after_s)  # whole seconds, at least one

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(self.retry_after_s).encode())]


class HeadTooLarge(GatewayError):
    status = 431
    error_type = "invalid_request_error"
    default_code = "request_header_fields_too_large"


class UpstreamUnavailable(GatewayError):
    status = 502
    error_type = "upstream_error"
    default_code = "upstream_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    error_type = "upstream_error"
    default_code = "upstream_timeout"


class ShuttingDown(GatewayError):
    """The server's shutdown grace ran out before this request was answered."""

    status = 503
    error_type = "server_error"
    default_code = "shutting_down"


class Overloaded(GatewayError):
    """The gateway has no room for this request now (memory for its body, a file descriptor, a
    connection)."""

    status = 503
    error_type = "server_error"
    default_code = "overloaded"


class FrameworkHttpError(GatewayError):
    """An HTTP error starlette raised that has no class here (its status and its message)."""

    error_type = "invalid_request_error"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
