"""Authentication: who is on the other end of a handshake or HTTP request.

:class:`Request` is the transport-neutral view of a handshake or HTTP request
that adapters build; an :class:`Authenticator` turns it into an
:class:`Identity` or raises :class:`~pmhub.errors.Unauthenticated`.
:class:`SessionAuthenticator` is the batteries-included one: an HMAC-signed
``session`` cookie with server-side revocation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from .errors import Unauthenticated

__all__ = [
    "Authenticator",
    "Identity",
    "Request",
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
    """

    async def authenticate(self, request: Request) -> Identity: ...


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
    """Signed ``session`` cookies (HMAC-SHA256) with server-side revocation.

    ``issue(user_id)`` makes a cookie value for a user who logged in;
    ``revoke(value)`` ends that session for good (the hub then closes its
    connections). Revocations live in memory for the life of the token; every
    process that serves the same users must share the secret.
    """

    cookie_name = "session"

    def __init__(
        self,
        secret: str | bytes,
        *,
        max_age: float = 7 * 24 * 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        key = secret.encode() if isinstance(secret, str) else secret
        if len(key) < 16:
            raise ValueError("SessionAuthenticator needs a secret of at least 16 bytes")
        self._key = key
        self.max_age = max_age
        self._clock = clock
        self._revoked: dict[str, float] = {}
        self._decoder = msgspec.json.Decoder(_Token)

    def issue(self, user_id: int) -> str:
        """A fresh signed cookie value for ``user_id``."""
        token = _Token(user_id, secrets.token_urlsafe(12), self._clock() + self.max_age)
        payload = _b64(msgspec.json.encode(token))
        return f"{payload}.{self._sign(payload)}"

    def verify(self, value: str) -> Identity:
        """The identity a cookie value carries, or raise ``Unauthenticated``."""
        payload, _, signature = value.partition(".")
        # Compared as bytes: compare_digest refuses str with non-ASCII characters.
        if not hmac.compare_digest(_utf8(signature), _utf8(self._sign(payload))):
            raise Unauthenticated("the session cookie is invalid: log in again")
        try:
            token = self._decoder.decode(_unb64(payload))
        except (ValueError, msgspec.DecodeError):
            raise Unauthenticated("the session cookie is invalid: log in again") from None
        now = self._clock()
        if token.expires <= now:
            raise Unauthenticated("the session has expired: log in again")
        if token.session_id in self._revoked:
            raise Unauthenticated("the session was logged out: log in again", status=403)
        return Identity(token.user_id, token.session_id)

    def revoke(self, value: str) -> Identity | None:
        """Revoke the session of a cookie value; return whose it was (None if invalid)."""
        try:
            identity = self.verify(value)
        except Unauthenticated:
            return None
        now = self._clock()
        self._revoked = {sid: exp for sid, exp in self._revoked.items() if exp > now}
        self._revoked[str(identity.session_id)] = now + self.max_age
        return identity

    async def authenticate(self, request: Request) -> Identity:
        value = request.cookies.get(self.cookie_name)
        if not value:
            raise Unauthenticated("no session cookie: log in first")
        return self.verify(value)

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, _utf8(payload), hashlib.sha256).digest())


def _utf8(text: str) -> bytes:
    # A server may decode undecodable header bytes to lone surrogates.
    return text.encode("utf-8", "surrogatepass")
