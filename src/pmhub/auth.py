"""Authentication: who is on the other end of a handshake or HTTP request.

:class:`Request` is the transport-neutral view of a handshake or HTTP request
that adapters build; an :class:`Authenticator` turns it into an
:class:`Identity` or raises :class:`~pmhub.errors.Unauthenticated`.
:class:`SessionAuthenticator` is the batteries-included one: an HMAC-signed
``session`` cookie whose logout is kept in the store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import msgspec

from .errors import BackendError, Rejected, Unauthenticated
from .limits import TokenBucket

__all__ = [
    "Authenticator",
    "Identity",
    "LoginThrottle",
    "Request",
    "RevocationStore",
    "SessionAuthenticator",
    "origin_allowed",
]


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated user; ``session_id`` lets a logout close its connections."""

    user_id: int
    session_id: str | None = None


@dataclass(frozen=True)
class Request:
    """A WebSocket handshake or HTTP request, as adapters see it.

    Header names are lower case; ``cookies`` is parsed from the ``Cookie`` header.
    """

    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    client: tuple[str, int] | None = None
    #: Query parameters (the first value of each), e.g. a token a browser
    #: cannot send as a header on a WebSocket handshake.
    query: Mapping[str, str] = field(default_factory=dict)

    @property
    def cookies(self) -> dict[str, str]:
        # Parsed leniently, as browsers send them: one malformed cookie of another
        # app on the same host must not hide the others (``SimpleCookie`` drops all).
        cookies: dict[str, str] = {}
        for pair in self.headers.get("cookie", "").split(";"):
            name, sep, value = pair.partition("=")
            name, value = name.strip(), value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if sep and name:
                cookies.setdefault(name, value)  # the first one is the most specific
        return cookies


class Authenticator(Protocol):
    """Turns a request into an identity.

    Raise :class:`~pmhub.errors.Unauthenticated` to refuse it: status 401 for
    missing or invalid credentials, 403 for credentials that were revoked.
    Raise :class:`~pmhub.errors.BackendError` when what you check against is
    down: the handshake or request is answered 503, not let through.
    """

    async def authenticate(self, request: Request) -> Identity: ...


class RevocationStore(Protocol):
    """Where logged-out sessions are kept until their cookies would expire.

    Both built-in message stores are one: give :class:`SessionAuthenticator`
    the hub's store, and a logout holds across restarts and for every process
    that shares the store.
    """

    async def revoke_session(self, session_id: str, expires_at: float, now: float) -> None:
        """Keep ``session_id`` as revoked; it may be forgotten after ``expires_at``.

        Times are seconds since the epoch; forget the sessions that expired by
        ``now``. Revoking a session twice keeps the first.
        """
        ...

    async def revocations_since(self, cursor: int) -> tuple[list[tuple[str, float]], int]:
        """The sessions revoked after ``cursor`` (``0``: all kept), each with when it
        expires, in the order they were revoked; and the cursor for the next call.

        Cursors grow in commit order, also across processes, so a reader that
        passes back the last one sees every later revocation exactly once.
        """
        ...


class LoginThrottle:
    """Slows down password guessing: failed logins per account and per address.

    Each account may fail ``account_burst`` times in a row, then once every
    ``1 / account_rate`` seconds; each client address has its own budget
    (``address_burst``, ``address_rate``), so one address cannot try many
    accounts either. Call :meth:`check` before checking a password (it raises
    ``rate_limited``: HTTP 429 with ``Retry-After``) and :meth:`failed` after a
    wrong one. A login that succeeds costs nothing.

    Behind a proxy, pass the client's address as the proxy reports it, not
    the proxy's. Counters live in this process.
    """

    def __init__(
        self,
        *,
        account_rate: float = 1 / 12,
        account_burst: int = 5,
        address_rate: float = 1 / 3,
        address_burst: int = 20,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._budgets = {
            "account": (account_rate, account_burst),
            "address": (address_rate, address_burst),
        }
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self.max_keys = max_keys
        self._clock = clock

    def check(self, account: str, address: str | None) -> None:
        """Raise ``rate_limited`` while the account or the address must wait."""
        now = self._clock()
        wait = max(
            (
                bucket.wait(now)
                for key in self._keys(account, address)
                if (bucket := self._buckets.get(key))
            ),
            default=0.0,
        )
        if wait:
            raise Rejected(
                "rate_limited", "too many failed logins: try again later", retry_after=wait
            )

    def failed(self, account: str, address: str | None) -> None:
        """Count a failed login against the account and the address."""
        now = self._clock()
        if len(self._buckets) >= self.max_keys:
            self._forget(now)
        for key in self._keys(account, address):
            bucket = self._buckets.get(key)
            if bucket is None:
                rate, burst = self._budgets[key[0]]
                bucket = self._buckets[key] = TokenBucket(rate, burst, now)
            bucket.take(now)

    def _keys(self, account: str, address: str | None) -> list[tuple[str, str]]:
        keys = [("account", account)]
        if address is not None:
            keys.append(("address", address))
        return keys

    def _forget(self, now: float) -> None:
        # Refilled buckets hold nothing; if that is not enough, the oldest go.
        self._buckets = {key: b for key, b in self._buckets.items() if not b.full(now)}
        excess = len(self._buckets) - self.max_keys // 2
        for key in list(self._buckets)[: max(excess, 0)]:
            del self._buckets[key]


def origin_allowed(origin: str | None, host: str | None, allowed: Collection[str]) -> bool:
    """Cross-site WebSocket hijacking guard for a browser ``Origin`` header.

    No ``Origin`` (a non-browser client) is allowed; ``null`` is refused; else
    the origin's ``host[:port]`` must equal ``Host`` or be in ``allowed``
    (whose entries may be full origins or bare ``host[:port]``).
    """
    if origin is None:
        return True
    origin = origin.strip()
    if origin == "null" or "://" not in origin:
        return False
    authority = _authority(origin)
    if not authority:
        return False
    return authority == (host or "").lower() or authority in {_authority(a) for a in allowed}


def _authority(origin: str) -> str:
    # "https://Example.com:8443/" -> "example.com:8443"; a bare host[:port] stays as is.
    return origin.split("://", 1)[-1].rstrip("/").lower()


class _Token(msgspec.Struct, frozen=True, array_like=True):
    user_id: int
    session_id: str
    expires: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionAuthenticator:
    """Signed ``session`` cookies (HMAC-SHA256), revocable by logging out.

    ``issue(user_id)`` makes a cookie value for a user who logged in;
    ``await revoke(value)`` ends that session for good: it is kept in
    ``revocations`` (the hub's store) until the cookie would have expired,
    so it stays refused after a restart and on every process that shares the
    store and the secret. (Close its open connections with ``hub.revoke``.)

    Handshakes do not each ask the store: the authenticator reads what was
    revoked since its last look at most every ``refresh_interval`` seconds,
    so a logout on another process holds here within that time (at once on
    this one).
    """

    cookie_name = "session"

    def __init__(
        self,
        secret: str | bytes,
        revocations: RevocationStore,
        *,
        max_age: float = 7 * 24 * 3600,
        refresh_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        key = secret.encode() if isinstance(secret, str) else secret
        if len(key) < 16:
            raise ValueError("SessionAuthenticator needs a secret of at least 16 bytes")
        self._key = key
        self.revocations = revocations
        self.max_age = max_age
        self.refresh_interval = refresh_interval
        self._clock = clock
        self._decoder = msgspec.json.Decoder(_Token)
        # The store's revocations as last read: session id → when it expires.
        self._revoked: dict[str, float] = {}
        self._cursor = 0
        self._fresh_until = -math.inf
        self._prune_at = -math.inf
        self._reading: anyio.Lock | None = None  # made on first use, in the server's loop

    def issue(self, user_id: int) -> str:
        """A fresh signed cookie value for ``user_id``."""
        token = _Token(user_id, secrets.token_urlsafe(12), self._clock() + self.max_age)
        payload = _b64(msgspec.json.encode(token))
        return f"{payload}.{self._sign(payload)}"

    async def verify(self, value: str) -> Identity:
        """The identity a cookie value carries, or raise ``Unauthenticated``."""
        token = self._token(value)
        if await self._is_revoked(token.session_id):
            raise Unauthenticated("the session was logged out: log in again", status=403)
        return Identity(token.user_id, token.session_id)

    async def revoke(self, value: str) -> Identity | None:
        """Log out the session of a cookie value; return whose it was (None if invalid)."""
        try:
            token = self._token(value)
        except Unauthenticated:
            return None
        if await self._is_revoked(token.session_id):
            return None
        try:
            await self.revocations.revoke_session(token.session_id, token.expires, self._clock())
        except Exception as exc:
            raise BackendError(f"could not record the logout: {exc}") from exc
        self._revoked[token.session_id] = token.expires
        return Identity(token.user_id, token.session_id)

    async def _is_revoked(self, session_id: str) -> bool:
        if session_id not in self._revoked and self._clock() >= self._fresh_until:
            if self._reading is None:
                self._reading = anyio.Lock()
            async with self._reading:  # one read serves every handshake waiting for it
                if self._clock() >= self._fresh_until:
                    await self._read_revocations()
        return session_id in self._revoked

    async def _read_revocations(self) -> None:
        try:
            new, self._cursor = await self.revocations.revocations_since(self._cursor)
        except Exception as exc:  # the store is down: refuse, as with any store outage
            raise BackendError(f"could not check the session: {exc}") from exc
        self._revoked.update(new)
        now = self._clock()
        if now >= self._prune_at:
            self._revoked = {sid: until for sid, until in self._revoked.items() if until > now}
            self._prune_at = now + 60.0
        self._fresh_until = now + self.refresh_interval

    async def authenticate(self, request: Request) -> Identity:
        value = request.cookies.get(self.cookie_name)
        if not value:
            raise Unauthenticated("no session cookie: log in first")
        return await self.verify(value)

    def _token(self, value: str) -> _Token:
        """The signed, unexpired token of a cookie value (revocation not checked)."""
        payload, _, signature = value.partition(".")
        # Compared as bytes: compare_digest refuses str with non-ASCII characters.
        if not hmac.compare_digest(_utf8(signature), _utf8(self._sign(payload))):
            raise Unauthenticated("the session cookie is invalid: log in again")
        try:
            token = self._decoder.decode(_unb64(payload))
        except (ValueError, msgspec.DecodeError):
            raise Unauthenticated("the session cookie is invalid: log in again") from None
        if token.expires <= self._clock():
            raise Unauthenticated("the session has expired: log in again")
        return token

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, _utf8(payload), hashlib.sha256).digest())


def _utf8(text: str) -> bytes:
    # A server may decode undecodable header bytes to lone surrogates.
    return text.encode("utf-8", "surrogatepass")
