"""The demo chat: its users, policy and login, shared by both example servers.

``python -m pmhub.demo`` (or ``examples/asgi_chat.py``) serves it on ASGI
(uvicorn) with the browser page at ``/``; ``examples/websockets_chat.py``
serves the same chat on the ``websockets`` adapter, accepting the cookies
this one's login sets. Needs ``pip install 'pmhub[examples]'``.

Users alice (1), bob (2), carol (3) and mallory (4), each with the password
equal to the name; mallory may converse only with carol. Messages and
logouts are kept in a SQLite file (``--db``, default ``pmhub-demo.db``).
Session cookies are signed with ``PMHUB_SECRET`` (a random secret when
unset, so a restart logs everyone out).
"""

from __future__ import annotations

import argparse
import functools
import hmac
import os
import secrets
from importlib import resources

import anyio
import msgspec

from . import Hub, Limits, PrometheusMetrics, SessionAuthenticator, SQLiteStore, StaticPolicy
from .adapters.asgi import (
    ASGIApp,
    PmhubApp,
    Receive,
    Scope,
    Send,
    read_json,
    respond_bytes,
    respond_error,
    respond_json,
    route_path,
    serve,
)
from .auth import LoginThrottle, Request
from .errors import BackendError, Rejected, Unauthenticated

__all__ = [
    "NAMES",
    "POLICY",
    "USERS",
    "Login",
    "User",
    "arguments",
    "build_app",
    "demo_secret",
    "main",
]

USERS = {"alice": 1, "bob": 2, "carol": 3, "mallory": 4}
NAMES = {user_id: name for name, user_id in USERS.items()}
POLICY = StaticPolicy(USERS.values(), only={USERS["mallory"]: {USERS["carol"]}})
#: The page and its assets, from the package (``pmhub.web``): path → (file, content type).
ASSETS = {
    "/": ("chat.html", b"text/html; charset=utf-8"),
    "/chat.js": ("chat.js", b"text/javascript; charset=utf-8"),
    "/chat.css": ("chat.css", b"text/css; charset=utf-8"),
}


class Login(msgspec.Struct, frozen=True):
    """``POST /api/login``."""

    username: str
    password: str


class User(msgspec.Struct, frozen=True):
    """A demo user: ``GET /api/me``, ``GET /api/users`` and the login's answer."""

    id: int
    username: str


def build_app(
    db: str = "pmhub-demo.db",
    secret: str | None = None,
    *,
    limits: Limits | None = None,
    metrics: PrometheusMetrics | None = None,
) -> tuple[ASGIApp, Hub]:
    """The demo application and its hub (tests build it with their own limits)."""
    store = SQLiteStore(db)  # keeps the messages, and the sessions that logged out
    auth = SessionAuthenticator(secret or demo_secret(), store)
    hub = Hub(store, POLICY, limits=limits, metrics=metrics)
    pmhub_app = PmhubApp(hub, auth)
    throttle = LoginThrottle()

    async def login(request: Request, receive: Receive, send: Send) -> None:
        body = await read_json(receive, Login, 4096)
        address = request.client[0] if request.client else None
        throttle.check(body.username, address)
        user_id = USERS.get(body.username)
        password, username = body.password.encode(), body.username.encode()
        # Compare even for unknown names so timing does not reveal who exists (as
        # bytes: compare_digest raises TypeError on str with non-ASCII characters).
        if not hmac.compare_digest(password, username) or user_id is None:
            throttle.failed(body.username, address)
            raise Unauthenticated("wrong username or password")
        cookie = (
            f"session={auth.issue(user_id)}; Path=/; HttpOnly; SameSite=Lax;"
            f" Max-Age={int(auth.max_age)}"
        )
        await respond_json(send, 200, _user(user_id), [(b"set-cookie", cookie.encode())])

    async def logout(request: Request, send: Send) -> None:
        value = request.cookies.get("session")
        identity = await auth.revoke(value) if value else None
        if identity is not None and identity.session_id is not None:
            await hub.revoke(identity.session_id)
        expired = b"session=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"
        await respond_json(send, 200, b'{"status":"ok"}', [(b"set-cookie", expired)])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        route = (scope["method"], route_path(scope)) if scope["type"] == "http" else None
        head = route is not None and route[0] == "HEAD"
        if head and route is not None:  # answered as GET, without the body
            route = ("GET", route[1])
        if route is None or route[1] not in DEMO_PATHS:
            await pmhub_app(scope, receive, send)
            return
        try:
            request = pmhub_app.guard(scope)  # a login is state-changing: no CSRF
            if route not in DEMO_ROUTES:
                allowed = ", ".join(method for method, path in DEMO_ROUTES if path == route[1])
                raise Rejected("method_not_allowed", f"use {allowed}", status=405)
            if route[0] == "GET" and route[1] in ASSETS:
                await _asset(send, route[1], head=head)
            elif route == ("POST", "/api/login"):
                await login(request, receive, send)
            elif route == ("POST", "/api/logout"):
                await logout(request, send)
            elif route == ("GET", "/api/me"):
                identity = await auth.authenticate(request)
                await respond_json(send, 200, _user(identity.user_id))
            elif route == ("GET", "/api/users"):
                identity = await auth.authenticate(request)
                peers = [
                    User(peer, NAMES[peer])
                    for peer in sorted(NAMES)
                    if await POLICY.may_converse(identity.user_id, peer)
                ]
                await respond_json(send, 200, msgspec.json.encode(peers))
        except Rejected as exc:
            hub.metrics.error(exc.code)
            await respond_error(send, exc)
        except BackendError:
            unavailable = Rejected("unavailable", "the service is unavailable: try again later")
            await respond_error(send, unavailable)

    return app, hub


DEMO_ROUTES = {
    *(("GET", path) for path in ASSETS),
    ("POST", "/api/login"),
    ("POST", "/api/logout"),
    ("GET", "/api/me"),
    ("GET", "/api/users"),
}
DEMO_PATHS = {path for _, path in DEMO_ROUTES}
PAGE_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        b" connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-frame-options", b"DENY"),  # frame-ancestors, for browsers without CSP 2
    (b"referrer-policy", b"no-referrer"),
]


@functools.cache
def _package_file(name: str) -> bytes:
    return (resources.files("pmhub.web") / name).read_bytes()


async def _asset(send: Send, path: str, *, head: bool = False) -> None:
    name, content_type = ASSETS[path]
    body = _package_file(name)
    headers = [(b"cache-control", b"no-cache"), *PAGE_HEADERS]
    await respond_bytes(send, content_type, body, headers, head=head)


def _user(user_id: int) -> bytes:
    return msgspec.json.encode(User(user_id, NAMES[user_id]))


def demo_secret() -> str:
    """``PMHUB_SECRET``, or a random secret (every restart then logs everyone out)."""
    return os.environ.get("PMHUB_SECRET") or secrets.token_hex(32)


def arguments(description: str) -> argparse.Namespace:
    """The flags every demo server takes: ``--host``, ``--port``, ``--db``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--db", default="pmhub-demo.db", help="SQLite file for messages")
    return parser.parse_args()


def main() -> None:
    """Serve the demo on ASGI (uvicorn), page included."""
    args = arguments(__doc__.split("\n\n")[0])
    app, hub = build_app(args.db, metrics=PrometheusMetrics())
    print(f"pmhub demo: open http://{args.host}:{args.port}/ (alice/alice, bob/bob, ...)")
    anyio.run(lambda: serve(app, hub, host=args.host, port=args.port))


if __name__ == "__main__":
    main()
