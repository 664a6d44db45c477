"""uvicorn's HTTP/1.1 (h11) and WebSocket protocols, with the limits pmhub needs.

uvicorn on its own waits forever for a request that never finishes (one
header byte a second keeps a socket and its buffer alive), takes headers of
any size with httptools, and logs a refused WebSocket handshake or invalid
UTF-8 as an error. :func:`protocols` returns subclasses that:

* close a connection whose request (head and body) is not complete within
  ``Limits.request_timeout`` seconds: 408 when it had started one;
* answer 431 to a head over ``Limits.max_header_size`` bytes, with more than
  ``Limits.max_headers`` headers, or with a line over 8 KiB (the longest the
  WebSocket handshake parser takes);
* answer malformed requests with a JSON 400, every answer with ``nosniff``;
* log refusals at INFO at most, and count them with ``metrics.error(code)``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from ..errors import ErrorCode, error_body
from ..limits import Limits
from ..metrics import Metrics

__all__ = ["MAX_HEADER_LINE", "protocols"]

logger = logging.getLogger("pmhub")

#: The longest header line, with its CRLF, that the handshake parser takes.
MAX_HEADER_LINE = 8192
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")


def _response(status: int, code: ErrorCode, message: str) -> bytes:
    """A complete HTTP/1.1 answer with a JSON error body, closing the connection."""
    body = error_body(code, message)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        "x-content-type-options: nosniff\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class _GuardedH11(H11Protocol):
    limits: Limits
    metrics: Metrics

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head = bytearray()  # the request head received so far
        self._lines = self._line_start = 0  # its complete lines; where the last one starts
        self._in_head = True
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head and not self._head_ok(data):
            return
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE):
            self._disarm()  # the whole request is in: the app has it

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._disarm()  # from here on the WebSocket's heartbeat watches the peer
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # kept alive: the next request is timed too
            self._new_head(in_head=True)
            self._arm()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "invalid_frame", f"not a valid HTTP/1.1 request: {msg}")

    def _head_ok(self, data: bytes) -> bool:
        # Only the new bytes are scanned: a head sent a byte at a time must not
        # cost the server a pass over everything received so far per byte.
        head = self._head
        scanned = len(head)
        head += data
        end = _END_OF_HEAD.search(head, max(0, scanned - 3))
        size = len(head) if end is None else end.start()
        while (newline := head.find(b"\n", scanned, size)) != -1:
            if newline - self._line_start + 1 > MAX_HEADER_LINE:
                break
            self._lines += 1
            self._line_start = scanned = newline + 1
        # The last newline counted may turn out to start the blank line that ends the head.
        if self._line_start > size:
            self._lines -= 1
        limits = self.limits
        if (
            size > limits.max_header_size
            or self._lines > limits.max_headers + (end is None)
            or size - self._line_start + 1 > MAX_HEADER_LINE
        ):
            self._refuse(
                431,
                "too_large",
                f"request headers are limited to {limits.max_header_size} bytes,"
                f" {limits.max_headers} headers and {MAX_HEADER_LINE} bytes a line",
            )
            return False
        if end is not None:
            self._new_head(in_head=False)
        return True

    def _new_head(self, *, in_head: bool) -> None:
        self._head.clear()
        self._lines = self._line_start = 0
        self._in_head = in_head

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.limits.request_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        started = bool(self._head) or not self._in_head
        if started and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            seconds = self.limits.request_timeout
            self._refuse(408, "request_timeout", f"the request took over {seconds:g} s")
        else:  # nothing sent yet (or the answer has begun): just close
            self.transport.close()

    def _refuse(self, status: int, code: ErrorCode, message: str) -> None:
        self._disarm()
        logger.info("refused an HTTP request from %s: %d %s", self.client, status, message)
        self.metrics.error(code)
        self.transport.write(_response(status, code, message))
        self.transport.close()


class _QuietWebSocket(WebSocketsSansIOProtocol):
    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not _is_utf8(self.frames):
            # A broken client, not a server error: close 1007 as RFC 6455 says.
            logger.info("closed a WebSocket of %s with 1007: invalid UTF-8", self.client)
            self.frames = []
            self.conn.send_close(1007, "invalid UTF-8 in a text frame")
            self.handle_parser_exception()
            return
        super().send_receive_event_to_app()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            # The app refused the handshake with an HTTP answer: that is a
            # complete handshake, not the error uvicorn would log at the end.
            self.handshake_complete = True


def _is_utf8(frames: list[bytes]) -> bool:
    try:
        for frame in frames if len(frames) == 1 else [b"".join(frames)]:
            frame.decode()
    except UnicodeDecodeError:
        return False
    return True


class _RefusalsAtInfo(logging.Filter):
    """uvicorn logs each malformed request as a WARNING: anyone could flood the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and record.msg == "Invalid HTTP request received.":
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def protocols(limits: Limits, metrics: Metrics) -> tuple[type[H11Protocol], type[Any]]:
    """The HTTP and WebSocket protocol classes to give ``uvicorn.Config``."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _RefusalsAtInfo) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_RefusalsAtInfo())
    http = type("PmhubH11Protocol", (_GuardedH11,), {"limits": limits, "metrics": metrics})
    return http, _QuietWebSocket
