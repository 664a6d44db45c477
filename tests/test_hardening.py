"""The demo under attack, run as a user runs it (``examples/asgi_chat.py``), over real sockets.

Each test is one way in that an outside test of the demo found open: requests
that never finish, oversized headers, a logout undone by a restart, login
CSRF and brute force, ids outside 64 bits, missing security headers, log
flooding and JSON with a key twice. The last test throws random HTTP requests
at every route: each gets a JSON 4xx or a 2xx, and the refused ones change
nothing stored.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import closing, suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import (
    DemoProcess,
    close_code_after,
    cookie_header,
    free_port,
    login,
    open_ws,
    recv_json,
    send_invalid_utf8,
)
from websockets.exceptions import InvalidStatus

from pmhub import MemoryStore, SessionAuthenticator

pytestmark = pytest.mark.anyio

SECRET = "hardening-test-secret-0123456789"
MINT = SessionAuthenticator(SECRET, MemoryStore())  # issues cookies the demo accepts
EVIL = "https://evil.example"
JSON_TYPE = {"content-type": "application/json"}
#: The demo's defaults (pmhub.Limits), which these tests measure against.
REQUEST_TIMEOUT = 10.0
MAX_HEADER_SIZE = 16 * 1024


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the clients (websockets, httpx) run on asyncio


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[DemoProcess]:
    server = DemoProcess(tmp_path / "demo.db", free_port(), tmp_path / "demo.log", SECRET)
    await server.start()
    try:
        yield server
    finally:
        code = await server.stop()
    log = server.text()
    assert code == 0, log
    assert "ERROR" not in log and "Traceback" not in log, log


def base(demo: DemoProcess) -> str:
    return demo.url.rstrip("/")


def ws_url(demo: DemoProcess) -> str:
    return f"ws://127.0.0.1:{demo.port}/ws"


async def raw_request(demo: DemoProcess, data: bytes, *, timeout: float = 30.0) -> bytes:
    """Send ``data`` on a fresh TCP connection; everything the server answers until it closes."""
    async with await anyio.connect_tcp("127.0.0.1", demo.port) as stream:
        # The server may refuse and close while we are still sending.
        with suppress(anyio.BrokenResourceError, OSError):
            await stream.send(data)
        return await read_to_eof(stream, timeout)


async def read_to_eof(stream: anyio.abc.SocketStream, timeout: float) -> bytes:
    answer = b""
    with anyio.fail_after(timeout):
        while True:
            try:
                answer += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return answer


def status_of(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert match, f"not an HTTP answer: {answer[:200]!r}"
    return int(match.group(1))


def error_body(answer: bytes) -> dict[str, Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    assert b"x-content-type-options: nosniff" in head.lower(), head
    error = json.loads(body)["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    return dict(error)


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


# -- 1. requests that never finish, and oversized headers ---------------------------------


async def test_slow_and_idle_requests_are_closed_while_logins_go_on(demo: DemoProcess) -> None:
    """300 sockets sending a header byte a second, idle ones and a slow body: all
    are closed after the request timeout (408 where a request had begun),
    while real users log in."""
    started = time.monotonic()
    answers: dict[str, list[tuple[bytes, float]]] = {"header": [], "idle": [], "body": []}

    async def attacker(kind: str, opening: bytes, drip: bytes) -> None:
        async with await anyio.connect_tcp("127.0.0.1", demo.port) as stream:
            opened = time.monotonic()
            if opening:
                await stream.send(opening)
            async with anyio.create_task_group() as tg:

                async def dribble() -> None:
                    while drip:
                        await anyio.sleep(1.0)  # the attack's pace, not a synchronisation
                        try:
                            await stream.send(drip)
                        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                            return

                tg.start_soon(dribble)
                answer = await read_to_eof(stream, REQUEST_TIMEOUT + 20)
                tg.cancel_scope.cancel()
            answers[kind].append((answer, time.monotonic() - opened))

    logins: list[float] = []

    async def user() -> None:
        while time.monotonic() - started < REQUEST_TIMEOUT - 1:
            begun = time.monotonic()
            await login(base(demo), "alice")
            logins.append(time.monotonic() - begun)
            await anyio.sleep(0.5)  # a user's pace

    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    body_head = (
        b"POST /api/login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    async with anyio.create_task_group() as tg:
        for _ in range(300):
            tg.start_soon(attacker, "header", head, b"X")
        for _ in range(20):
            tg.start_soon(attacker, "idle", b"", b"")
            tg.start_soon(attacker, "body", body_head, b" ")
        tg.start_soon(user)

    assert len(answers["header"]) == 300 and len(answers["idle"]) == 20
    for kind, expected in [("header", 408), ("body", 408)]:
        for answer, _ in answers[kind]:
            assert status_of(answer) == expected, answer
            assert error_body(answer)["code"] == "request_timeout"
    assert all(answer == b"" for answer, _ in answers["idle"])  # closed without a word
    longest = max(seconds for kind in answers.values() for _, seconds in kind)
    assert REQUEST_TIMEOUT - 1 < longest < REQUEST_TIMEOUT + 10
    assert len(logins) >= 5 and max(logins) < 5.0, logins


@pytest.mark.parametrize(
    ("what", "headers"),
    [
        ("a 16 KiB header", b"X-Big: " + b"a" * MAX_HEADER_SIZE + b"\r\n"),
        ("a 1 MiB header", b"X-Big: " + b"a" * 2**20 + b"\r\n"),
        ("200 headers", b"".join(b"X-%d: 1\r\n" % n for n in range(200))),
        ("10,000 headers", b"".join(b"X-%d: 1\r\n" % n for n in range(10_000))),
        ("a 9 KiB line", b"Cookie: a=" + b"b" * 9000 + b"\r\n"),
    ],
)
async def test_oversized_headers_get_431(demo: DemoProcess, what: str, headers: bytes) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n"
    answer = await raw_request(demo, request)
    assert status_of(answer) == 431, what
    assert error_body(answer)["code"] == "too_large"


async def test_a_16_kib_cookie_on_the_websocket_gets_431(demo: DemoProcess) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(ws_url(demo), headers={"Cookie": "session=" + "a" * 16384}):
            pass
    assert info.value.response.status_code == 431
    # Under the limits the handshake gets its real answer: the cookie is bad.
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(ws_url(demo), headers={"Cookie": "session=" + "a" * 7000}):
            pass
    assert info.value.response.status_code == 401


async def test_unterminated_huge_headers_cost_the_server_no_memory(demo: DemoProcess) -> None:
    assert demo.process is not None
    before = rss_kib(demo.process.pid)
    flood = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Flood: " + b"a" * (4 * 2**20)
    answers: list[bytes] = []

    async def one() -> None:
        answers.append(await raw_request(demo, flood))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(one)
    assert all(status_of(answer) == 431 for answer in answers if answer)
    grown = rss_kib(demo.process.pid) - before
    assert grown < 8 * 1024, f"the server grew by {grown} KiB"
    await login(base(demo), "alice")  # and it still serves


# -- 2. logout that lasts -------------------------------------------------------------------


async def test_a_logout_survives_a_restart_with_the_same_secret(demo: DemoProcess) -> None:
    session = await login(base(demo), "alice")
    async with httpx.AsyncClient(base_url=base(demo), headers=cookie_header(session)) as http:
        assert (await http.post("/api/logout")).status_code == 200
    await demo.stop()
    await demo.start()  # same file, same PMHUB_SECRET
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(ws_url(demo), session):
            pass
    assert info.value.response.status_code == 403
    async with httpx.AsyncClient(base_url=base(demo), headers=cookie_header(session)) as http:
        for path in ["/api/conversations", "/api/me", "/api/messages/2"]:
            response = await http.get(path)
            assert response.status_code == 403, path
            assert response.json()["error"]["code"] == "forbidden"
    async with open_ws(ws_url(demo), await login(base(demo), "alice")) as ws:
        assert (await recv_json(ws))["type"] == "system"  # a new login works


# -- 3. login CSRF, 4. brute force ----------------------------------------------------------

STATE_CHANGING = [
    ("/api/login", b'{"username": "alice", "password": "alice"}'),
    ("/api/logout", b""),
    ("/api/messages", b'{"recipient_id": 2, "content": "forged"}'),
    ("/api/messages/2/read", b'{"up_to_id": 1}'),
]


@pytest.mark.parametrize(("path", "body"), STATE_CHANGING)
async def test_state_changing_routes_refuse_foreign_pages(
    demo: DemoProcess, path: str, body: bytes
) -> None:
    session = MINT.issue(1)
    async with httpx.AsyncClient(base_url=base(demo), headers=cookie_header(session)) as http:
        foreign = await http.post(path, content=body, headers={**JSON_TYPE, "origin": EVIL})
        assert foreign.status_code == 403
        assert foreign.json()["error"]["code"] == "forbidden"
        for content_type in ["text/plain", "application/x-www-form-urlencoded", None]:
            headers = {"content-type": content_type} if content_type else {}
            response = await http.post(path, content=body or b"x=1", headers=headers)
            assert response.status_code == 415, (content_type, response.text)
            assert response.json()["error"]["code"] == "unsupported_media_type"
            assert "set-cookie" not in response.headers
        same_site = {**JSON_TYPE, "origin": f"http://127.0.0.1:{demo.port}"}
        assert (await http.post(path, content=body, headers=same_site)).status_code < 300
    if path == "/api/messages":
        assert demo.stored("forged") == 1  # only the same-site send


async def test_password_guessing_is_throttled_per_account_and_per_address(
    demo: DemoProcess,
) -> None:
    async with httpx.AsyncClient(base_url=base(demo)) as http:

        async def attempt(username: str, password: str) -> httpx.Response:
            return await http.post("/api/login", json={"username": username, "password": password})

        statuses = [(await attempt("bob", f"guess-{n}")).status_code for n in range(200)]
        assert statuses[:5] == [401] * 5
        assert statuses[5:].count(429) >= 194  # a slow run may earn one more try back
        throttled = await attempt("bob", "bob")  # even the right password must wait
        assert throttled.status_code == 429
        assert int(throttled.headers["retry-after"]) >= 1
        assert throttled.json()["error"]["code"] == "rate_limited"
        assert (await attempt("alice", "alice")).status_code == 200  # other accounts work

        # One address trying many accounts runs out too (20 failures in all).
        statuses = [(await attempt(f"user{n}", "x")).status_code for n in range(30)]
        assert 15 <= statuses.count(401) <= 17 and statuses[-5:] == [429] * 5
        assert (await attempt("carol", "carol")).status_code == 429


# -- 5. ids outside the range of the frames --------------------------------------------------


async def test_ids_outside_53_bits_are_400_not_a_store_outage(demo: DemoProcess) -> None:
    huge = ["100000000000000000000", str(2**63), str(-(2**63) - 1), str(2**53 + 1)]
    async with httpx.AsyncClient(base_url=base(demo), headers=cookie_header(MINT.issue(1))) as http:
        responses = [await http.get(f"/api/messages/2?before_id={n}") for n in huge]
        responses += [await http.get(f"/api/messages/2?limit={n}") for n in huge]
        responses += [await http.get(f"/api/messages/{n}") for n in huge]
        responses += [
            await http.post(f"/api/messages/{n}/read", json={"up_to_id": 1}) for n in huge
        ]
        responses += [
            await http.post(
                "/api/messages/2/read", content=f'{{"up_to_id": {n}}}', headers=JSON_TYPE
            )
            for n in huge
        ]
        for response in responses:
            assert response.status_code == 400, (response.url, response.text)
            assert response.json()["error"]["code"] == "invalid_frame"
        assert (await http.get("/api/messages/2?before_id=9007199254740992")).status_code == 200
        assert (await http.get("/healthz")).json()["status"] == "ok"
        metrics = (await http.get("/metrics")).text
    assert 'pmhub_errors_total{code="unavailable"}' not in metrics


# -- 6. headers -------------------------------------------------------------------------


async def test_every_answer_says_nosniff_and_the_page_cannot_be_framed(demo: DemoProcess) -> None:
    async with httpx.AsyncClient(base_url=base(demo)) as http:
        responses = [
            await http.get("/"),
            await http.get("/api/me"),
            await http.get("/healthz"),
            await http.get("/metrics"),
            await http.get("/no/such/route"),
            await http.post("/api/login", content=b"x", headers={"content-type": "text/plain"}),
            await http.get("/api/me", headers=cookie_header(MINT.issue(1))),
            await http.get("/ws"),  # not an upgrade: a plain 404
        ]
    for response in responses:
        assert response.headers["x-content-type-options"] == "nosniff", response.url
    page = responses[0]
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp
    assert page.headers["x-frame-options"] == "DENY"
    # The page's own favicon is a data: URL, which its CSP must allow.
    assert '<link rel="icon" href="data:,">' in page.text
    assert re.search(r"img-src [^;]*data:", csp)
    # The refused handshake and the server's own refusals too.
    refused = await raw_request(
        demo,
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    assert status_of(refused) == 401 and error_body(refused)["code"] == "unauthenticated"
    garbage = await raw_request(demo, b"NOT HTTP AT ALL\r\n\r\n")
    assert status_of(garbage) == 400 and error_body(garbage)["code"] == "invalid_frame"


# -- 7. log flooding, 8. duplicate keys -------------------------------------------------------


async def test_refusals_are_counted_not_logged_as_errors(demo: DemoProcess) -> None:
    for _ in range(50):
        with pytest.raises(InvalidStatus) as info:
            async with open_ws(ws_url(demo)):
                pass
        assert info.value.response.status_code == 401
    async with open_ws(ws_url(demo), MINT.issue(1)) as ws:
        assert (await recv_json(ws))["type"] == "system"
        send_invalid_utf8(ws)
        assert await close_code_after(ws) == 1007
    async with httpx.AsyncClient(base_url=base(demo)) as http:
        metrics = (await http.get("/metrics")).text
    counted = re.search(r'pmhub_errors_total\{code="unauthenticated"\} (\d+)', metrics)
    assert counted and float(counted.group(1)) >= 50
    # The demo fixture asserts that the log has no ERROR line and no traceback.


async def test_a_key_given_twice_is_an_invalid_frame(demo: DemoProcess) -> None:
    twice = '{"type": "private_message", "recipient_id": 2, "content": "a", "content": "b"}'
    async with open_ws(ws_url(demo), MINT.issue(1)) as ws:
        assert (await recv_json(ws))["type"] == "system"
        await ws.send(twice)
        while (frame := await recv_json(ws))["type"] != "error":
            pass
        assert frame["code"] == "invalid_frame" and "'content'" in frame["message"]
    async with httpx.AsyncClient(base_url=base(demo), headers=cookie_header(MINT.issue(1))) as http:
        response = await http.post(
            "/api/messages",
            content=b'{"recipient_id": 3, "recipient_id": 2, "content": "x"}',
            headers=JSON_TYPE,
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_frame"
    assert demo.stored() == 0


# -- any request at all -------------------------------------------------------------------

ROUTES = [
    "/",
    "/api/login",
    "/api/logout",
    "/api/me",
    "/api/users",
    "/api/messages",
    "/api/conversations",
    "/healthz",
    "/metrics",
    "/ws",
]
segments = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.text(max_size=12),
    st.sampled_from(["1", "2", "4", "0", "-1", "01", "1e3", "٣", " 2", "2/read"]),
).map(lambda text: quote(text, safe=""))
paths = st.one_of(
    st.sampled_from(ROUTES),
    segments.map(lambda s: f"/api/messages/{s}"),
    segments.map(lambda s: f"/api/messages/{s}/read"),
    segments.map(lambda s: f"/{s}"),
    segments.map(lambda s: f"/api/{s}"),
)
queries = st.dictionaries(
    st.sampled_from(["before_id", "limit", "after_id", "x"]) | st.text(max_size=5),
    segments,
    max_size=3,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=64),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "recipient_id": st.integers(-(2**70), 2**70) | st.sampled_from([2, 3, 4]),
            "content": st.text(max_size=30),
            "client_id": st.text(max_size=140),
            "up_to_id": st.integers(-(2**70), 2**70),
            "username": st.sampled_from(["alice", "bob", "nobody", ""]),
            "password": st.sampled_from(["alice", "bob", "x"]),
        },
    ).map(lambda value: json.dumps(value).encode()),
)
requests = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
        | st.from_regex(r"[A-Z]{1,8}", fullmatch=True),
        "path": paths,
        "query": queries,
        "body": bodies,
        "content_type": st.sampled_from(
            [None, "application/json", "application/json; charset=utf-8", "text/plain"]
        ),
        "origin": st.sampled_from([None, "same", EVIL, "null"]),
        "cookie": st.sampled_from([None, "valid", "garbage"]),
    }
)


def snapshot(db: Path) -> tuple[Any, ...]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        messages = conn.execute("SELECT count(*), total(is_read), max(id) FROM messages")
        revoked = conn.execute("SELECT count(*) FROM revoked_sessions")
        return (*messages.fetchone(), *revoked.fetchone())


async def test_any_http_request_gets_a_json_4xx_or_a_2xx(demo: DemoProcess) -> None:
    async with httpx.AsyncClient(base_url=base(demo)) as http:  # opens the file and its tables
        response = await http.get("/api/conversations", headers=cookie_header(MINT.issue(2)))
        assert response.status_code == 200
    origin = f"http://127.0.0.1:{demo.port}"

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(requests)
    def check(request: dict[str, Any]) -> None:
        headers = {}
        if request["content_type"]:
            headers["content-type"] = request["content_type"]
        if request["origin"]:
            headers["origin"] = origin if request["origin"] == "same" else request["origin"]
        if request["cookie"] == "valid":
            headers.update(cookie_header(MINT.issue(1)))
        elif request["cookie"] == "garbage":
            headers.update(cookie_header("garbage.value"))
        before = snapshot(demo.db)
        with httpx.Client(base_url=base(demo), timeout=30) as http:
            response = http.request(
                request["method"],
                request["path"],
                params=request["query"],
                content=request["body"],
                headers=headers,
            )
        status = response.status_code
        assert 200 <= status < 300 or 400 <= status < 500, (status, response.text)
        assert response.headers.get("x-content-type-options") == "nosniff"
        if status >= 400:
            assert snapshot(demo.db) == before, "a refused request changed what is stored"
            if request["method"] != "HEAD":
                error = response.json()["error"]
                assert isinstance(error["code"], str) and error["message"]

    check()
