"""The demo page in a real browser (src/pmhub/web: chat.html, chat.js, client.js).

Runs ``examples/asgi_chat.py`` in its own process (as tests/test_example.py
does) and drives Debian's Chromium (``/usr/bin/chromium``) with Playwright.
The page runs under the demo's strict Content-Security-Policy (no eval), so
the test waits on locators and polls with ``page.evaluate``, never
``wait_for_function``. Each page installs Playwright's clock (timers that
still run in real time) so the test can jump over the reconnect backoff
instead of waiting it out; nothing waits with a sleep.

* :func:`test_unsent_messages_survive_a_restart_a_new_login_and_a_reload`:
  without ``PMHUB_SECRET`` every start signs cookies with a new secret, so a
  restart ends the session: the outbox survives it, a new login and a
  reload, is never shown or sent as another user, and is sent exactly once.
* :func:`test_alice_and_bob_chat_through_a_server_restart`: two browser
  contexts with a fixed secret: messages both ways, typing, presence, read
  ticks, the unread count in the title, "new messages", a restart
  mid-conversation that loses and doubles nothing, a message typed while the
  server is down, an XSS payload shown as text, and the phone layout.

Screenshots go to the test's ``tmp_path``; with ``PMHUB_SCREENSHOTS=1`` the two
of the docs are written to ``docs/screenshot.png`` (1280x800) and
``docs/screenshot-phone.png`` (390x844) instead.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, closing
from datetime import datetime, time, timedelta, timezone
from pathlib import Path

import pytest
from servers import DemoProcess, free_port

from pmhub import Draft, SQLiteStore

try:
    from playwright.async_api import (
        Browser,
        Dialog,
        Locator,
        Page,
        ViewportSize,
        async_playwright,
        expect,
    )
    from playwright.async_api import Error as PlaywrightError
except ImportError as exc:
    PLAYWRIGHT_MISSING: str | None = f"playwright cannot be imported ({exc})"
else:
    PLAYWRIGHT_MISSING = None

pytestmark = pytest.mark.anyio

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SIZES: dict[str, ViewportSize] = {
    "desktop": {"width": 1280, "height": 800},
    "phone": {"width": 390, "height": 844},
}
ALICE, BOB, CAROL = 1, 2, 3
#: Generous bound for anything the page does after an event (slow CI machines).
WAIT_MS = 30_000
DOCS = Path(__file__).resolve().parent.parent / "docs"
UNAVAILABLE = PLAYWRIGHT_MISSING or (
    None if CHROMIUM.is_file() else f"{CHROMIUM} does not exist (apt-get install chromium)"
)
REQUIRED = os.environ.get("PMHUB_REQUIRE_SERVICES") == "1"
CONNECTED = re.compile(r"\bup\b")

if UNAVAILABLE is not None and not REQUIRED:
    pytest.skip(f"{UNAVAILABLE}; needed by the browser test", allow_module_level=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Playwright's async API runs on asyncio


def require_browser() -> None:
    """Fail (the module is skipped instead unless PMHUB_REQUIRE_SERVICES=1) without one."""
    if UNAVAILABLE is not None:
        pytest.fail(f"{UNAVAILABLE}; PMHUB_REQUIRE_SERVICES=1 makes this a failure")


@asynccontextmanager
async def demo(tmp_path: Path, secret: str | None = None) -> AsyncIterator[DemoProcess]:
    server = DemoProcess(tmp_path / "demo.db", free_port(), tmp_path / "demo.log", secret)
    try:
        yield server
    finally:
        code = await server.stop()
    assert code == 0 and "Traceback" not in server.text(), server.text()


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        expect.set_options(timeout=WAIT_MS)
        try:
            yield browser
        finally:
            await browser.close()


async def new_page(browser: Browser, size: str = "desktop", **options: object) -> Page:
    """A page in a browser context of its own (its own cookies and localStorage).

    No ``bypass_csp``: the page must work under the demo's CSP. Times are shown
    in UTC, so the seeded history lands on a known day.
    """
    context = await browser.new_context(
        viewport=SIZES[size], locale="en-US", timezone_id="UTC", **options
    )
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    # Fake timers that still run in real time: the test may jump over the
    # reconnect backoff (up to 15 s) instead of waiting it out.
    await page.clock.install()
    return page


def watch_dialogs(page: Page, seen: list[str]) -> None:
    """Collect in ``seen`` (and dismiss) every alert/confirm/prompt the page opens."""

    async def on_dialog(dialog: Dialog) -> None:
        seen.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", on_dialog)


async def sign_in(page: Page, username: str) -> None:
    await expect(page.locator("#login")).to_be_visible()
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill(username)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#me")).to_have_text(username)
    await expect(page.locator("#conn")).to_have_class(CONNECTED)


async def open_chat(page: Page, peer_id: int, name: str) -> None:
    await page.click(f"#people .person[data-id='{peer_id}']")
    await expect(page.locator("#peer-name")).to_have_text(name)


async def send(page: Page, text: str) -> None:
    await page.get_by_label("Message", exact=True).fill(text)
    await page.press("#text", "Enter")


def bubbles(page: Page, text: str | None = None, who: str = "") -> Locator:
    """The message bubbles (``who``: ``.mine`` or ``.theirs``), those showing exactly ``text``."""
    found = page.locator(f"#list .msg{who}")
    if text is not None:
        found = found.filter(has=page.locator(".text").get_by_text(text, exact=True))
    return found


async def expect_once_confirmed(page: Page, text: str) -> None:
    """``text`` is shown exactly once in the open conversation, as a stored message of mine."""
    shown = page.locator("#list .msg.mine").filter(
        has=page.locator(".text").get_by_text(text, exact=True)
    )
    await expect(shown).to_have_count(1)
    await expect(shown).not_to_have_class(re.compile(r"pending|failed"))
    await expect(shown.locator(".ticks")).to_have_count(1)  # only stored messages have ticks


async def expect_once_received(page: Page, text: str) -> None:
    await expect(bubbles(page, text, ".theirs")).to_have_count(1)


async def outbox(page: Page, user_id: int) -> list[str]:
    """The contents in the page's stored outbox of ``user_id``."""
    return list(
        await page.evaluate(
            """(key) => {
                const box = JSON.parse(localStorage.getItem(key));
                return box ? box.messages.map((m) => m.content) : [];
            }""",
            f"pmhub.outbox.{user_id}",
        )
    )


async def until_sent(page: Page, user_id: int) -> None:
    """Wait until the server has confirmed every message of the stored outbox."""
    deadline = asyncio.get_running_loop().time() + WAIT_MS / 1000
    while await outbox(page, user_id):
        assert asyncio.get_running_loop().time() < deadline, await outbox(page, user_id)
        await asyncio.sleep(0.05)  # poll interval only; the wait is on the page's state


async def past_backoff(page: Page, ready: Callable[[int], Awaitable[None]]) -> None:
    """Jump the page's clock past its reconnect delay (at most 15 s) until ``ready`` passes.

    ``ready(timeout_ms)`` is an ``expect``. The jump is repeated because the
    page may be between two attempts when it comes (asking whether its
    session is still valid) and only then start the next delay.
    """
    deadline = asyncio.get_running_loop().time() + WAIT_MS / 1000
    while True:
        await page.clock.fast_forward("00:20")
        try:
            await ready(2_000)
            return
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise


async def reconnect(*pages: Page) -> None:
    """Skip the reconnect backoff of ``pages`` and wait until they are connected again."""
    for page in pages:
        conn = page.locator("#conn")
        await past_backoff(page, lambda ms, c=conn: expect(c).to_have_class(CONNECTED, timeout=ms))


async def no_notices(*pages: Page) -> None:
    """Let the toasts (the welcome, ...) time out, for a clean screenshot."""
    for page in pages:
        await page.clock.fast_forward("00:10")
        await expect(page.locator("#notices .toast")).to_have_count(0)


async def screenshots(page: Page, tmp_path: Path, what: str) -> None:
    for name in SIZES:
        await page.set_viewport_size(SIZES[name])
        await page.screenshot(path=tmp_path / f"{what}-{name}.png")
    await page.set_viewport_size(SIZES["desktop"])


async def seed_yesterday(db: Path) -> None:
    """Two messages between alice and bob, sent and read yesterday at noon (UTC)."""
    store = SQLiteStore(db)
    try:
        saved = await store.save_many(
            [
                Draft(BOB, ALICE, "Are we still on for the demo tomorrow?"),
                Draft(ALICE, BOB, "Yes! 10 o'clock, I'll bring the slides."),
            ]
        )
    finally:
        await store.aclose()
    noon = datetime.combine(datetime.now(timezone.utc).date(), time(12), timezone.utc)
    millis = int((noon - timedelta(days=1)).timestamp() * 1000)
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(
            "UPDATE messages SET created_at = ?, is_read = 1 WHERE id = ?",
            [(millis + i * 60_000, message.id) for i, (message, _) in enumerate(saved)],
        )


async def test_unsent_messages_survive_a_restart_a_new_login_and_a_reload(
    tmp_path: Path,
) -> None:
    first = "Hi bob, the server is up"
    second = "Sent while the server was down"
    third = "Sent while down, then the page was reloaded"
    require_browser()
    async with demo(tmp_path) as server, chromium() as browser:
        await server.start()
        page = await new_page(browser)

        # 1. alice chats with bob.
        await page.goto(server.url)
        await sign_in(page, "alice")
        await open_chat(page, BOB, "bob")
        await send(page, first)
        await expect_once_confirmed(page, first)
        assert server.stored(first) == 1

        # 2. The server stops; alice goes on typing.
        assert await server.stop() == 0
        await expect(page.locator("#conn")).not_to_have_class(CONNECTED)
        await send(page, second)
        pending = page.locator("#list .msg.pending").filter(has_text=second)
        await expect(pending).to_have_count(1)
        await expect(pending.locator(".meta")).to_have_text("waiting for connection…")
        assert await outbox(page, ALICE) == [second]

        # 3. It starts with a new secret: the page's session is gone.
        await server.start()
        login = page.locator("#login")
        await past_backoff(page, lambda ms: expect(login).to_be_visible(timeout=ms))
        await expect(page.locator("#login-error")).to_contain_text("session has expired")
        await expect(page.locator("#login-outbox")).to_have_text(
            "1 unsent message will be sent when you log in again as alice."
        )
        assert server.stored(second) == 0

        # 4. alice signs in again: sent once, with its original client_id.
        await sign_in(page, "alice")
        await until_sent(page, ALICE)
        assert server.stored(second) == 1
        await open_chat(page, BOB, "bob")
        await expect_once_confirmed(page, first)
        await expect_once_confirmed(page, second)
        await expect(page.locator("#list .msg.pending")).to_have_count(0)
        assert server.stored(second) == 1

        # 5. Stopped again; a third message; the page is reloaded (and fails).
        assert await server.stop() == 0
        await expect(page.locator("#conn")).not_to_have_class(CONNECTED)
        await send(page, third)
        await expect(page.locator("#list .msg.pending").filter(has_text=third)).to_have_count(1)
        await screenshots(page, tmp_path, "pending")
        with pytest.raises(PlaywrightError, match="ERR_CONNECTION_REFUSED"):
            await page.reload()
        await server.start()
        await page.goto(server.url)
        notice = "1 unsent message will be sent when you log in again as alice."
        await expect(page.locator("#login-outbox")).to_have_text(notice)
        await screenshots(page, tmp_path, "login-notice")

        # bob on the same browser: alice's outbox is not his to show or send.
        await sign_in(page, "bob")
        await open_chat(page, ALICE, "alice")
        await expect(bubbles(page, who=".theirs")).to_have_count(2)  # from history
        await expect(bubbles(page, who=".mine")).to_have_count(0)
        await expect(page.get_by_text(third)).to_have_count(0)
        assert await outbox(page, ALICE) == [third]
        assert await outbox(page, BOB) == []
        await page.get_by_role("button", name="Log out").click()
        await expect(page.locator("#login-outbox")).to_have_text(notice)
        assert server.stored(third) == 0

        await sign_in(page, "alice")
        await until_sent(page, ALICE)
        await open_chat(page, BOB, "bob")
        for text in (first, second, third):
            await expect_once_confirmed(page, text)
        await expect(bubbles(page)).to_have_count(3)
        assert [server.stored(text) for text in (first, second, third)] == [1, 1, 1]
        assert server.stored() == 3
        await screenshots(page, tmp_path, "conversation")


async def test_alice_and_bob_chat_through_a_server_restart(tmp_path: Path) -> None:
    require_browser()
    shots = DOCS if os.environ.get("PMHUB_SCREENSHOTS") == "1" else tmp_path
    await seed_yesterday(tmp_path / "demo.db")
    history = ["Are we still on for the demo tomorrow?", "Yes! 10 o'clock, I'll bring the slides."]
    async with demo(tmp_path, secret="s3cret" * 8) as server, chromium() as browser:
        await server.start()
        alice, bob = await new_page(browser), await new_page(browser)
        dialogs: list[str] = []
        for page in (alice, bob):
            watch_dialogs(page, dialogs)
        for page, name in ((alice, "alice"), (bob, "bob")):
            await page.goto(server.url)
            await sign_in(page, name)

        # Presence: each sees the other online, carol offline, with text alternatives.
        await expect(alice.locator(".person[data-id='2'] .dot")).to_have_attribute(
            "aria-label", "online"
        )
        await expect(alice.locator(".person[data-id='3'] .dot")).to_have_attribute(
            "aria-label", "offline"
        )
        await open_chat(alice, BOB, "bob")
        await expect(alice.locator("#peer-status")).to_have_text("online")
        await expect(alice.locator("#list .day")).to_have_text(["Yesterday"])
        await expect(alice.locator("#list .msg .text")).to_have_text(history)
        await open_chat(bob, ALICE, "alice")

        # Typing, then a message each way; read ticks as the other one reads.
        await alice.locator("#text").press_sequentially("Morning! The slides")
        await expect(bob.locator("#typing")).to_have_text("alice is typing…")
        await expect(bob.locator(".person[data-id='1'] .preview")).to_have_text("typing…")
        await alice.locator("#text").press_sequentially(" are done.")
        await alice.press("#text", "Enter")
        await expect_once_received(bob, "Morning! The slides are done.")
        await expect(bob.locator("#typing")).to_have_text("")
        await expect_once_confirmed(alice, "Morning! The slides are done.")
        await expect(alice.locator("#list .msg.mine .ticks").last).to_have_attribute(
            "aria-label", "read"
        )
        await send(bob, "Great, send them over when you can.")
        await expect_once_received(alice, "Great, send them over when you can.")
        await send(alice, "Here they are: pmhub-demo.pdf")
        await expect_once_received(bob, "Here they are: pmhub-demo.pdf")
        await expect(bob.locator("#list .msg.mine .ticks").last).to_have_attribute(
            "aria-label", "read"
        )
        await expect(alice.locator("#list .day")).to_have_text(["Yesterday", "Today"])

        # The screenshots of the docs: bob is typing his answer.
        await no_notices(alice)
        await bob.locator("#text").press_sequentially("Thanks")
        await expect(alice.locator("#typing")).to_have_text("bob is typing…")
        await alice.screenshot(path=shots / "screenshot.png")
        await alice.set_viewport_size(SIZES["phone"])
        await expect(alice.locator("#typing")).to_have_text("bob is typing…")
        await alice.screenshot(path=shots / "screenshot-phone.png")
        await bob.fill("#text", "")

        # The phone layout: a usable conversation, no sideways scrolling, Back to the list.
        for part in ("#messages", "#composer"):
            box = await alice.locator(part).bounding_box()
            assert box is not None and box["width"] >= 350, (part, box)
        assert await alice.evaluate("document.scrollingElement.scrollWidth <= innerWidth")
        await expect(alice.locator("#people")).to_be_hidden()
        await alice.get_by_role("button", name="Back to chats").click()
        await expect(alice.locator("#people")).to_be_visible()
        await expect(alice.locator("#conversation")).to_be_hidden()
        assert await alice.evaluate("document.scrollingElement.scrollWidth <= innerWidth")
        await alice.screenshot(path=tmp_path / "phone-list.png")
        await open_chat(alice, BOB, "bob")
        await expect(alice.locator("#composer")).to_be_visible()
        await expect(alice.locator("#people")).to_be_hidden()
        await alice.set_viewport_size(SIZES["desktop"])

        # Unread: while bob looks elsewhere, the title counts; opening the chat reads it.
        await open_chat(bob, CAROL, "carol")
        await send(alice, "Did you get them?")
        await expect(bob).to_have_title("(1) pmhub chat")
        await expect(bob.locator(".person[data-id='1'] .badge")).to_have_text("1 unread")
        await expect(alice.locator("#list .msg.mine .ticks").last).to_have_attribute(
            "aria-label", "sent"
        )
        await open_chat(bob, ALICE, "alice")
        await expect(bob).to_have_title("pmhub chat")
        await expect(alice.locator("#list .msg.mine .ticks").last).to_have_attribute(
            "aria-label", "read"
        )

        # "New messages ↓" when scrolled up; clicking it goes down (and reads them).
        await bob.set_viewport_size({"width": 1280, "height": 420})
        await bob.locator("#messages").evaluate("(box) => { box.scrollTop = 0; }")
        await send(alice, "One more thing")
        jump = bob.get_by_role("button", name="New messages ↓")
        await expect(jump).to_be_visible()
        await expect(bob).to_have_title("(1) pmhub chat")
        await jump.click()
        await expect(jump).to_be_hidden()
        await expect(bob).to_have_title("pmhub chat")
        await expect(bubbles(bob, "One more thing", ".theirs")).to_be_in_viewport()
        await bob.set_viewport_size(SIZES["desktop"])

        # Content is text, never HTML.
        xss = "<img src=x onerror=alert(1)>"
        await send(alice, xss)
        for page in (alice, bob):
            await expect(bubbles(page, xss)).to_have_count(1)
            await expect(page.locator("#list img")).to_have_count(0)

        # The server restarts mid-conversation; alice writes while it is down.
        assert await server.stop() == 0
        for page in (alice, bob):
            await expect(page.locator("#conn")).not_to_have_class(CONNECTED)
        down = "Typed while the server was down"
        await send(alice, down)
        await expect(alice.locator("#list .msg.pending .meta")).to_have_text(
            "waiting for connection…"
        )
        await server.start()
        await reconnect(alice, bob)
        await expect_once_confirmed(alice, down)
        await expect_once_received(bob, down)
        await send(bob, "Back again")
        await expect_once_received(alice, "Back again")
        await expect(bob.locator("#list .msg.mine .ticks").last).to_have_attribute(
            "aria-label", "read"
        )

        # Nothing lost or doubled: the same bubbles on both sides, each stored once.
        texts = [
            *history,
            "Morning! The slides are done.",
            "Great, send them over when you can.",
            "Here they are: pmhub-demo.pdf",
            "Did you get them?",
            "One more thing",
            xss,
            down,
            "Back again",
        ]
        for page in (alice, bob):
            await expect(page.locator("#list .msg .text")).to_have_text(texts)
            await expect(page.locator("#list .msg.pending, #list .msg.failed")).to_have_count(0)
        assert [server.stored(text) for text in texts] == [1] * len(texts)
        assert server.stored() == len(texts)
        # The welcome is shown once per page load, not again after the reconnect.
        for page in (alice, bob):
            await expect(page.locator("#notices .toast")).to_have_count(0)
        assert dialogs == []

        # A reload keeps the open conversation, and still shows each message once.
        await alice.reload()
        await expect(alice.locator("#peer-name")).to_have_text("bob")
        await expect(alice.locator("#list .msg .text")).to_have_text(texts)
        await expect(alice.locator("#notices .toast")).to_have_count(1)  # this load's welcome

        # The same conversation in dark mode (for a look; not part of the docs).
        dark = await new_page(browser, color_scheme="dark")
        await dark.goto(server.url)
        await sign_in(dark, "bob")
        await open_chat(dark, ALICE, "alice")
        await expect(dark.locator("#list .msg")).to_have_count(len(texts))
        await no_notices(dark)
        await screenshots(dark, tmp_path, "dark")
