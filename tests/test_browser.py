"""The demo page in a real browser: messages typed while the server is down survive it.

Runs ``examples/asgi_chat.py`` in its own process (as tests/test_example.py
does) but without ``PMHUB_SECRET``, so each start signs cookies with a new
random secret and the page's session is gone after a restart. Chromium
(Debian's ``/usr/bin/chromium``, driven by Playwright) is the user:

1. alice signs in, opens her conversation with bob and sends a message.
2. The server stops (SIGTERM); alice sends a second one, shown as pending.
3. The server starts again: the page finds its session expired and shows the
   login screen, saying that 1 unsent message is waiting for alice.
4. alice signs in again: the message is sent with its original ``client_id``,
   stored exactly once and shown once, confirmed.
5. With the server stopped, alice sends a third one and the page is reloaded
   (and fails to load). With the server back, bob signs in first: alice's
   outbox is neither shown nor sent as bob. Then alice signs in: it is sent
   exactly once.

Screenshots (1280x800 and 390x844) of the pending bubble, the login notice and
the final conversation go to the test's ``tmp_path``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from servers import DemoProcess, free_port

try:
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import Page, ViewportSize, async_playwright, expect
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
ALICE, BOB = 1, 2
#: Generous bound for anything the page does after an event (slow CI machines).
WAIT_MS = 30_000
UNAVAILABLE = PLAYWRIGHT_MISSING or (
    None if CHROMIUM.is_file() else f"{CHROMIUM} does not exist (apt-get install chromium)"
)
REQUIRED = os.environ.get("PMHUB_REQUIRE_SERVICES") == "1"

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
async def demo(tmp_path: Path) -> AsyncIterator[DemoProcess]:
    server = DemoProcess(tmp_path / "demo.db", free_port(), tmp_path / "demo.log")
    try:
        yield server
    finally:
        code = await server.stop()
    assert code == 0 and "Traceback" not in server.text(), server.text()


@asynccontextmanager
async def browser_page() -> AsyncIterator[Page]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            # bypass_csp: page.wait_for_function evaluates its source like eval().
            context = await browser.new_context(bypass_csp=True)
            page = await context.new_page()
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)
            await page.set_viewport_size(SIZES["desktop"])
            yield page
        finally:
            await browser.close()


async def sign_in(page: Page, username: str) -> None:
    await expect(page.locator("#login")).to_be_visible()
    await page.fill("#username", username)
    await page.fill("#password", username)
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#me")).to_have_text(username)
    await expect(page.locator("#conn")).to_have_class("up")


async def send(page: Page, text: str) -> None:
    await page.fill("#text", text)
    await page.press("#text", "Enter")


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
    await page.wait_for_function(
        "(key) => localStorage.getItem(key) === null", arg=f"pmhub.outbox.{user_id}"
    )


async def expect_once_confirmed(page: Page, text: str) -> None:
    """``text`` is shown exactly once in the open conversation, as a stored message of mine."""
    shown = page.locator("#list .msg").filter(has=page.get_by_text(text, exact=True))
    await expect(shown).to_have_count(1)
    await expect(shown).to_have_class("msg mine")  # not "pending" or "failed"
    await expect(shown.locator(".ticks")).to_have_count(1)  # only stored messages have ticks


async def screenshots(page: Page, tmp_path: Path, what: str) -> None:
    for name in SIZES:
        await page.set_viewport_size(SIZES[name])
        await page.screenshot(path=tmp_path / f"{what}-{name}.png")
    await page.set_viewport_size(SIZES["desktop"])


async def test_unsent_messages_survive_a_restart_a_new_login_and_a_reload(
    tmp_path: Path,
) -> None:
    first = "Hi bob, the server is up"
    second = "Sent while the server was down"
    third = "Sent while down, then the page was reloaded"
    require_browser()
    async with demo(tmp_path) as server:
        await server.start()
        async with browser_page() as page:
            # Fake timers that still run in real time: the test may jump over the
            # reconnect backoff (up to 15 s) instead of waiting it out.
            await page.clock.install()

            # 1. alice chats with bob.
            await page.goto(server.url)
            await sign_in(page, "alice")
            await page.click(f"#people button[data-id='{BOB}']")
            await expect(page.locator("#peer-name")).to_have_text("bob")
            await send(page, first)
            await expect_once_confirmed(page, first)
            assert server.stored(first) == 1

            # 2. The server stops; alice goes on typing.
            assert await server.stop() == 0
            await expect(page.locator("#conn")).not_to_have_class("up")
            await send(page, second)
            pending = page.locator("#list .msg.pending").filter(has_text=second)
            await expect(pending).to_have_count(1)
            await expect(pending.locator(".meta")).to_have_text("waiting for connection…")
            assert await outbox(page, ALICE) == [second]

            # 3. It starts with a new secret: the page's session is gone.
            await server.start()
            await page.clock.fast_forward("00:20")  # past any reconnect delay
            await expect(page.locator("#login")).to_be_visible()
            await expect(page.locator("#login-error")).to_contain_text("session has expired")
            await expect(page.locator("#login-outbox")).to_have_text(
                "1 unsent message will be sent when you log in again as alice."
            )
            assert server.stored(second) == 0

            # 4. alice signs in again: sent once, with its original client_id.
            await sign_in(page, "alice")
            await until_sent(page, ALICE)
            assert server.stored(second) == 1
            await page.click(f"#people button[data-id='{BOB}']")
            await expect_once_confirmed(page, first)
            await expect_once_confirmed(page, second)
            await expect(page.locator("#list .msg.pending")).to_have_count(0)
            assert server.stored(second) == 1

            # 5. Stopped again; a third message; the page is reloaded (and fails).
            assert await server.stop() == 0
            await expect(page.locator("#conn")).not_to_have_class("up")
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
            await page.click(f"#people button[data-id='{ALICE}']")
            await expect(page.locator("#list .msg.theirs")).to_have_count(2)  # from history
            await expect(page.locator("#list .msg.mine")).to_have_count(0)
            await expect(page.get_by_text(third)).to_have_count(0)
            assert await outbox(page, ALICE) == [third]
            assert await outbox(page, BOB) == []
            await page.click("#logout")
            await expect(page.locator("#login-outbox")).to_have_text(notice)
            assert server.stored(third) == 0

            await sign_in(page, "alice")
            await until_sent(page, ALICE)
            await page.click(f"#people button[data-id='{BOB}']")
            for text in (first, second, third):
                await expect_once_confirmed(page, text)
            await expect(page.locator("#list .msg")).to_have_count(3)
            assert [server.stored(text) for text in (first, second, third)] == [1, 1, 1]
            assert server.stored() == 3
            await screenshots(page, tmp_path, "conversation")
