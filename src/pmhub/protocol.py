"""Per-connection protocol rules, without I/O: frames in, decisions out.

:class:`ConnectionProtocol` turns each inbound WebSocket message into a client
frame to execute, an ``error`` frame to send back, or a close. It knows nothing
of sockets, stores or other connections, so tests drive it directly; the hub
executes what it decides and adapters only move bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import Rejected
from .frames import ClientFrame, Error, decode_client_frame
from .limits import Limits

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_NORMAL",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_TOO_LARGE",
    "CLOSE_TRY_AGAIN_LATER",
    "Close",
    "ConnectionProtocol",
    "Reply",
]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_LARGE = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013


@dataclass(frozen=True)
class Reply:
    """Send this ``error`` frame back; the connection stays open."""

    frame: Error


@dataclass(frozen=True)
class Close:
    """Close the connection with this WebSocket close code."""

    code: int
    reason: str


class ConnectionProtocol:
    """Decides what one inbound WebSocket message means for its connection."""

    __slots__ = ("invalid_in_a_row", "limits")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        #: ``invalid_frame`` errors in a row; any valid frame resets it.
        self.invalid_in_a_row = 0

    def receive(self, data: str | bytes, *, binary: bool = False) -> ClientFrame | Reply | Close:
        """Return the frame to execute, an error to send back, or a close."""
        limit = self.limits.max_frame_size
        # Encode a text frame once, for the size check and the decoder alike; one
        # with more characters than the limit is too large in bytes anyway.
        raw = (
            data.encode("utf-8", "surrogatepass")
            if isinstance(data, str) and len(data) <= limit
            else data
        )
        if len(raw) > limit:
            return Close(CLOSE_TOO_LARGE, f"frame over {limit} bytes")
        if binary:
            return self._invalid("binary frames are not accepted: send JSON as a text frame")
        try:
            frame = decode_client_frame(raw)
        except Rejected as exc:
            return self._invalid(exc.message)
        self.invalid_in_a_row = 0
        return frame

    def _invalid(self, message: str) -> Reply | Close:
        self.invalid_in_a_row += 1
        if self.invalid_in_a_row >= self.limits.max_invalid_frames:
            return Close(CLOSE_POLICY_VIOLATION, "too many invalid frames in a row")
        return Reply(Error("invalid_frame", message))
