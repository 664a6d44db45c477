"""Exceptions raised by pmhub.

Errors are split by whose fault they are::

    PmhubError
    ├── Rejected                the peer sent something pmhub will not do;
    │   │                       becomes an ``error`` frame or an HTTP 4xx
    │   └── Unauthenticated     no or bad credentials (HTTP 401, refused handshake)
    └── BackendError            a store or broker failed; nothing confirmed is lost
                                (close 1011, HTTP 503)

Local misuse of the API (a bad argument, a hub used before it started) raises
``ValueError`` or ``RuntimeError`` at once, with a message naming the fix.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "BackendError",
    "ErrorCode",
    "PmhubError",
    "Rejected",
    "Unauthenticated",
    "error_body",
]

#: Every error code pmhub sends, in ``error`` frames and HTTP bodies. The
#: first four are the WebSocket's; the rest are HTTP's (and refused handshakes').
ErrorCode = Literal[
    "invalid_frame",
    "forbidden",
    "too_long",
    "rate_limited",
    "unauthenticated",
    "not_found",
    "method_not_allowed",
    "request_timeout",
    "too_large",
    "unsupported_media_type",
    "unavailable",
]

#: HTTP status for each error code of the wire protocol.
STATUS_BY_CODE: dict[ErrorCode, int] = {
    "invalid_frame": 400,
    "too_long": 400,
    "unauthenticated": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "too_large": 413,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "unavailable": 503,
}


class PmhubError(Exception):
    """Root of every exception pmhub raises on purpose."""


class Rejected(PmhubError):
    """A request from the peer was refused with a protocol error code.

    ``code`` is one of the wire protocol's error codes; ``retry_after`` is set
    (in seconds) for ``rate_limited``.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.status = status if status is not None else STATUS_BY_CODE.get(code, 400)


class Unauthenticated(Rejected):
    """The request carries no valid credentials (or a revoked session: status 403)."""

    def __init__(self, message: str, *, status: int = 401) -> None:
        super().__init__(
            "unauthenticated" if status == 401 else "forbidden", message, status=status
        )


class BackendError(PmhubError):
    """A store or broker call failed; the operation was not confirmed."""


def error_body(code: ErrorCode, message: str) -> bytes:
    """The JSON body of an HTTP refusal: ``{"error": {"code": ..., "message": ...}}``."""
    return msgspec.json.encode({"error": {"code": code, "message": message}})
