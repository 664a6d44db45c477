"""Limits and the token bucket that enforces rates. Pure code: time is passed in."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits", "TokenBucket", "TypingTimers"]


@dataclass(frozen=True)
class Limits:
    """Every tunable limit of a hub, with the wire protocol's defaults."""

    #: Longest message content, in characters (after trimming it must be non-empty).
    max_content_length: int = 4000
    #: Largest inbound frame in bytes; a larger one closes the connection with 1009.
    max_frame_size: int = 64 * 1024
    #: Private messages per second per user, and the burst allowed above it.
    message_rate: float = 10.0
    message_burst: int = 20
    #: Typing indicators per second per user (and burst).
    typing_rate: float = 5.0
    typing_burst: int = 5
    #: Seconds after which a typing indicator not refreshed is turned off.
    typing_timeout: float = 3.0
    #: Consecutive ``invalid_frame`` errors that close a connection with 1008.
    max_invalid_frames: int = 50
    #: Frames, and bytes, a connection may have waiting to be sent; overflow
    #: closes it with 1013. Bulk replies (``sync`` pages, resends) wait for the
    #: queue to be half empty instead.
    max_queue: int = 4096
    max_queue_bytes: int = 1024 * 1024
    #: Open connections per user, across nodes; one more is closed with 1013.
    max_connections_per_user: int = 20
    #: Most sends committed in one transaction; more wait for the next one.
    max_batch_size: int = 1000
    #: Messages per ``sync`` page.
    sync_page_size: int = 500
    #: Largest ``limit`` of a history page (larger ones are clamped).
    max_history_page: int = 200
    #: Seconds between pings, and how long a ping may go unanswered.
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    #: HTTP requests, where pmhub runs the server (``serve()``): seconds to
    #: receive a whole request (else 408 and close), and the most bytes and
    #: headers in its head (else 431).
    request_timeout: float = 10.0
    max_header_size: int = 16 * 1024
    max_headers: int = 100

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:  # also refuses NaN
                raise ValueError(f"Limits.{name} must be positive, got {value!r}")


class TokenBucket:
    """Allows ``rate`` events per second with bursts of up to ``burst``."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when allowed, else the seconds to wait for one."""
        wait = self.wait(now)
        if not wait:
            self.tokens -= 1.0
        return wait

    def wait(self, now: float) -> float:
        """Like :meth:`take` without taking: 0.0 when a token is there, else the wait."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        """True when the bucket has refilled completely (it can be forgotten)."""
        self._refill(now)
        return self.tokens >= self.burst


class TypingTimers:
    """Deadlines after which a typing indicator is turned off by the server.

    Every timer runs for the same ``timeout``, so keeping the dict in
    insertion order (a refresh moves a key to the end) keeps it in deadline
    order: the first entry always expires first.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._deadlines: dict[tuple[int, int], float] = {}

    def start(self, user_id: int, recipient_id: int, now: float) -> None:
        """``user_id`` is typing to ``recipient_id``: (re)start its timer."""
        self._deadlines.pop((user_id, recipient_id), None)
        self._deadlines[(user_id, recipient_id)] = now + self.timeout

    def stop(self, user_id: int, recipient_id: int) -> bool:
        """Cancel a timer; True if one was running."""
        return self._deadlines.pop((user_id, recipient_id), None) is not None

    def stop_user(self, user_id: int) -> list[int]:
        """Cancel every timer of ``user_id``; return the recipients they had."""
        pairs = [pair for pair in self._deadlines if pair[0] == user_id]
        for pair in pairs:
            del self._deadlines[pair]
        return [recipient for _, recipient in pairs]

    def next_deadline(self) -> float | None:
        """When the first timer expires, or None when none runs."""
        return next(iter(self._deadlines.values()), None)

    def expire(self, now: float) -> list[tuple[int, int]]:
        """Remove and return the ``(user_id, recipient_id)`` pairs whose time is up."""
        expired = []
        for pair, deadline in self._deadlines.items():
            if deadline > now:
                break
            expired.append(pair)
        for pair in expired:
            del self._deadlines[pair]
        return expired
