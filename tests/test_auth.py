"""Session cookies, the Origin guard and cookie parsing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmhub import MemoryStore, SQLiteStore
from pmhub.auth import Identity, Request, SessionAuthenticator, origin_allowed
from pmhub.errors import BackendError, Rejected, Unauthenticated
from pmhub.testing import check_revocations

SECRET = "0123456789abcdef"  # 16 bytes, the shortest allowed


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def request_with(cookie: str) -> Request:
    return Request("/ws", {"cookie": cookie})


def make(secret: str | bytes = SECRET, **options: Any) -> SessionAuthenticator:
    return SessionAuthenticator(secret, MemoryStore(), **options)


async def refused(auth: SessionAuthenticator, value: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as info:
        await auth.verify(value)
    assert isinstance(info.value, Rejected)
    return info.value


# -- SessionAuthenticator ---------------------------------------------------------------

pytestmark = pytest.mark.anyio


async def test_issue_and_verify_round_trip() -> None:
    auth = make()
    value = auth.issue(42)
    identity = await auth.verify(value)
    assert identity.user_id == 42
    assert identity.session_id
    assert await auth.authenticate(request_with(f"theme=dark; session={value}")) == identity


async def test_each_login_is_a_new_session() -> None:
    auth = make()
    first, second = auth.issue(1), auth.issue(1)
    assert first != second
    assert (await auth.verify(first)).session_id != (await auth.verify(second)).session_id


def test_cookie_value_is_safe_in_a_cookie_header() -> None:
    value = make().issue(1)
    assert value.isascii()
    assert not set(value) & set(' ;,"\\=')


@pytest.mark.parametrize("where", ["payload", "signature"])
async def test_tampered_cookie_is_refused_401(where: str) -> None:
    auth = make()
    payload, signature = auth.issue(1).split(".")
    if where == "payload":
        payload = payload[:-1] + ("A" if payload[-1] != "A" else "B")
    else:
        signature = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    error = await refused(auth, f"{payload}.{signature}")
    assert (error.status, error.code) == (401, "unauthenticated")


async def test_cookie_signed_with_another_secret_is_refused() -> None:
    value = make("another secret, 16+ bytes").issue(1)
    assert (await refused(make(), value)).status == 401


async def test_expired_session_is_refused_401() -> None:
    clock = Clock()
    auth = make(max_age=60, clock=clock)
    value = auth.issue(1)
    clock.now += 59.9
    assert (await auth.verify(value)).user_id == 1
    clock.now += 0.1
    error = await refused(auth, value)
    assert error.status == 401
    assert "expired" in error.message


async def test_revoked_session_is_refused_403() -> None:
    auth = make()
    value, other = auth.issue(1), auth.issue(1)
    assert await auth.revoke(value) is not None
    error = await refused(auth, value)
    assert error.status == 403
    assert error.code == "forbidden"
    assert (await auth.verify(other)).user_id == 1  # another login of the same user still works


async def test_revoke_returns_whose_session_it_was() -> None:
    auth = make()
    value = auth.issue(7)
    session_id = (await auth.verify(value)).session_id
    assert await auth.revoke(value) == Identity(7, session_id)
    assert await auth.revoke(value) is None  # already revoked
    assert await auth.revoke("garbage") is None


async def test_a_logout_holds_for_a_new_process_on_the_same_file(tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    first = SQLiteStore(db)
    value = SessionAuthenticator(SECRET, first).issue(1)
    assert await SessionAuthenticator(SECRET, first).revoke(value) is not None
    await first.aclose()
    second = SQLiteStore(db)  # a restart, or another process on the same file
    try:
        error = await refused(SessionAuthenticator(SECRET, second), value)
        assert error.status == 403
    finally:
        await second.aclose()


async def test_revocations_are_kept_until_the_cookie_expires() -> None:
    clock = Clock()
    store = MemoryStore()
    auth = SessionAuthenticator(SECRET, store, max_age=60, clock=clock)
    value = auth.issue(1)
    await auth.revoke(value)
    clock.now += 59  # another logout prunes only what expired
    await auth.revoke(auth.issue(2))
    assert len((await store.revocations_since(0))[0]) == 2
    clock.now += 2
    await auth.revoke(auth.issue(3))
    assert len((await store.revocations_since(0))[0]) == 2  # the first cookie has expired


async def test_a_logout_on_another_process_holds_within_the_refresh_interval() -> None:
    clock = Clock()
    store = MemoryStore()  # shared, as a SQLite file is by two processes
    here = SessionAuthenticator(SECRET, store, clock=clock, refresh_interval=1.0)
    there = SessionAuthenticator(SECRET, store, clock=clock, refresh_interval=1.0)
    value = here.issue(1)
    assert (await there.verify(value)).user_id == 1  # `there` has read the store now
    assert await here.revoke(value) is not None
    await refused(here, value)  # at once on the process that logged out
    clock.now += 0.5
    assert (await there.verify(value)).user_id == 1  # not yet read there
    clock.now += 0.5
    assert (await refused(there, value)).status == 403  # read within the interval
    assert await there.revoke(value) is None  # already revoked


class BrokenRevocations:
    async def revoke_session(self, session_id: str, expires_at: float, now: float) -> None:
        raise OSError("disk on fire")

    async def revocations_since(self, cursor: int) -> tuple[list[tuple[str, float]], int]:
        raise OSError("disk on fire")


async def test_a_store_outage_refuses_the_session_rather_than_letting_it_in() -> None:
    auth = SessionAuthenticator(SECRET, BrokenRevocations())
    value = auth.issue(1)
    with pytest.raises(BackendError, match="disk on fire"):
        await auth.verify(value)
    with pytest.raises(BackendError, match="disk on fire"):
        await auth.revoke(value)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_builtin_stores_keep_revocations(store: str, tmp_path: Path) -> None:
    if store == "memory":
        await check_revocations(MemoryStore())
        return
    stores = [SQLiteStore(tmp_path / "r.db")]

    async def reopen() -> SQLiteStore:
        await stores[-1].aclose()
        stores.append(SQLiteStore(tmp_path / "r.db"))
        return stores[-1]

    try:
        await check_revocations(stores[0], reopen=reopen)
    finally:
        await stores[-1].aclose()


@pytest.mark.parametrize("secret", ["", "short", "0123456789abcde", b"\x00" * 15])
def test_short_secret_raises_value_error(secret: str | bytes) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        make(secret)


async def test_bytes_secret_is_accepted() -> None:
    auth = make(b"\xff" * 32)
    assert (await auth.verify(auth.issue(3))).user_id == 3


@pytest.mark.parametrize(
    "value",
    [
        "",
        ".",
        "abc",
        "abc.",
        ".abc",
        "a.b.c",
        "abc.\u00e9",
        "\u00e9.abc",
        "\ud800.\udce9",
        "x" * 5000,
    ],
)
async def test_garbage_cookie_is_refused_401(value: str) -> None:
    assert (await refused(make(), value)).status == 401


@given(st.text(alphabet=st.characters(codec=None, categories=None)))
def test_any_text_is_an_identity_or_unauthenticated(value: str) -> None:
    try:
        anyio.run(make().verify, value)
    except Unauthenticated as exc:
        assert exc.status == 401


@pytest.mark.parametrize("cookie", ["", "theme=dark", "session=", "session=nope"])
async def test_authenticate_without_a_valid_session_cookie_is_401(cookie: str) -> None:
    with pytest.raises(Unauthenticated) as info:
        await make().authenticate(request_with(cookie))
    assert info.value.status == 401


async def test_authenticate_without_a_cookie_header_is_401() -> None:
    with pytest.raises(Unauthenticated) as info:
        await make().authenticate(Request("/ws"))
    assert info.value.status == 401


# -- origin_allowed ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "expected"),
    [
        (None, "chat.example.com", [], True),  # not a browser
        (None, None, [], True),
        ("null", "chat.example.com", [], False),
        (" null ", "chat.example.com", ["null"], False),
        ("https://chat.example.com", "chat.example.com", [], True),
        ("https://chat.example.com/", "chat.example.com", [], True),
        ("http://localhost:8000", "localhost:8000", [], True),
        ("HTTPS://Chat.Example.COM", "chat.example.com", [], True),
        ("https://app.example.org", "chat.example.com", ["app.example.org"], True),
        ("https://APP.example.org", "chat.example.com", ["app.Example.org"], True),
        ("https://app.example.org", "chat.example.com", ["https://app.example.org/"], True),
        ("https://app.example.org:8443", "chat.example.com", ["app.example.org"], False),
        ("https://evil.example.net", "chat.example.com", ["app.example.org"], False),
        ("https://chat.example.com.evil.net", "chat.example.com", [], False),
        ("http://localhost:8001", "localhost:8000", [], False),
        ("https://chat.example.com", None, [], False),
        ("chat.example.com", "chat.example.com", [], False),  # scheme-less
        ("garbage", "chat.example.com", [], False),
        ("", "chat.example.com", [], False),
        ("://", "", [], False),  # an empty authority is no origin, even without Host
        ("https://", None, [], False),
    ],
)
def test_origin_allowed(
    origin: str | None, host: str | None, allowed: list[str], expected: bool
) -> None:
    assert origin_allowed(origin, host, allowed) is expected


# -- Request.cookies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "cookies"),
    [
        ("", {}),
        ("session=abc", {"session": "abc"}),
        ("session=abc; theme=dark", {"session": "abc", "theme": "dark"}),
        ("  session = abc ;theme=dark;", {"session": "abc", "theme": "dark"}),
        ('session="abc.def"', {"session": "abc.def"}),
        ("session=abc.def-_==", {"session": "abc.def-_=="}),
        # Malformed neighbours do not hide the session cookie.
        ("junk; session=abc", {"session": "abc"}),
        ("session=abc; junk", {"session": "abc"}),
        ("b@d name=1; session=abc", {"b@d name": "1", "session": "abc"}),
        ('prefs={"a": [1, 2]}; session=abc', {"prefs": '{"a": [1, 2]}', "session": "abc"}),
        ('x="unterminated; session=abc', {"x": '"unterminated', "session": "abc"}),
        ("=orphan; session=abc", {"session": "abc"}),
        (";;;", {}),
        # The first of two cookies with one name is the most specific (RFC 6265 5.4).
        ("session=inner; session=outer", {"session": "inner"}),
    ],
)
def test_cookies_are_parsed_leniently(header: str, cookies: dict[str, str]) -> None:
    assert request_with(header).cookies == cookies


def test_no_cookie_header_means_no_cookies() -> None:
    assert Request("/ws", {"host": "x"}).cookies == {}


@given(st.text())
def test_any_cookie_header_parses(header: str) -> None:
    cookies = request_with(header).cookies
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in cookies.items())
