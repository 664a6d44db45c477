"""Session cookies, the Origin guard and cookie parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmhub.auth import Identity, Request, SessionAuthenticator, origin_allowed
from pmhub.errors import Rejected, Unauthenticated

SECRET = "0123456789abcdef"  # 16 bytes, the shortest allowed


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def request_with(cookie: str) -> Request:
    return Request("/ws", {"cookie": cookie})


def refused(auth: SessionAuthenticator, value: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as info:
        auth.verify(value)
    assert isinstance(info.value, Rejected)
    return info.value


# -- SessionAuthenticator ---------------------------------------------------------------


@pytest.mark.anyio
async def test_issue_and_verify_round_trip() -> None:
    auth = SessionAuthenticator(SECRET)
    value = auth.issue(42)
    identity = auth.verify(value)
    assert identity.user_id == 42
    assert identity.session_id
    assert await auth.authenticate(request_with(f"theme=dark; session={value}")) == identity


def test_each_login_is_a_new_session() -> None:
    auth = SessionAuthenticator(SECRET)
    first, second = auth.issue(1), auth.issue(1)
    assert first != second
    assert auth.verify(first).session_id != auth.verify(second).session_id


def test_cookie_value_is_safe_in_a_cookie_header() -> None:
    value = SessionAuthenticator(SECRET).issue(1)
    assert value.isascii()
    assert not set(value) & set(' ;,"\\=')


@pytest.mark.parametrize("where", ["payload", "signature"])
def test_tampered_cookie_is_refused_401(where: str) -> None:
    auth = SessionAuthenticator(SECRET)
    payload, signature = auth.issue(1).split(".")
    if where == "payload":
        payload = payload[:-1] + ("A" if payload[-1] != "A" else "B")
    else:
        signature = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    error = refused(auth, f"{payload}.{signature}")
    assert (error.status, error.code) == (401, "unauthenticated")


def test_cookie_signed_with_another_secret_is_refused() -> None:
    value = SessionAuthenticator("another secret, 16+ bytes").issue(1)
    assert refused(SessionAuthenticator(SECRET), value).status == 401


def test_expired_session_is_refused_401() -> None:
    clock = Clock()
    auth = SessionAuthenticator(SECRET, max_age=60, clock=clock)
    value = auth.issue(1)
    clock.now += 59.9
    assert auth.verify(value).user_id == 1
    clock.now += 0.1
    error = refused(auth, value)
    assert error.status == 401
    assert "expired" in error.message


def test_revoked_session_is_refused_403() -> None:
    auth = SessionAuthenticator(SECRET)
    value, other = auth.issue(1), auth.issue(1)
    assert auth.revoke(value) is not None
    error = refused(auth, value)
    assert error.status == 403
    assert error.code == "forbidden"
    assert auth.verify(other).user_id == 1  # another login of the same user still works


def test_revoke_returns_whose_session_it_was() -> None:
    auth = SessionAuthenticator(SECRET)
    value = auth.issue(7)
    session_id = auth.verify(value).session_id
    assert auth.revoke(value) == Identity(7, session_id)
    assert auth.revoke(value) is None  # already revoked
    assert auth.revoke("garbage") is None


@pytest.mark.parametrize("secret", ["", "short", "0123456789abcde", b"\x00" * 15])
def test_short_secret_raises_value_error(secret: str | bytes) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        SessionAuthenticator(secret)


def test_bytes_secret_is_accepted() -> None:
    auth = SessionAuthenticator(b"\xff" * 32)
    assert auth.verify(auth.issue(3)).user_id == 3


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
def test_garbage_cookie_is_refused_401(value: str) -> None:
    assert refused(SessionAuthenticator(SECRET), value).status == 401


@given(st.text(alphabet=st.characters(codec=None, categories=None)))
def test_any_text_is_an_identity_or_unauthenticated(value: str) -> None:
    try:
        SessionAuthenticator(SECRET).verify(value)
    except Unauthenticated as exc:
        assert exc.status == 401


@pytest.mark.anyio
@pytest.mark.parametrize("cookie", ["", "theme=dark", "session=", "session=nope"])
async def test_authenticate_without_a_valid_session_cookie_is_401(cookie: str) -> None:
    with pytest.raises(Unauthenticated) as info:
        await SessionAuthenticator(SECRET).authenticate(request_with(cookie))
    assert info.value.status == 401


@pytest.mark.anyio
async def test_authenticate_without_a_cookie_header_is_401() -> None:
    with pytest.raises(Unauthenticated) as info:
        await SessionAuthenticator(SECRET).authenticate(Request("/ws"))
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
