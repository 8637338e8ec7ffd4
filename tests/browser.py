"""Helpers for the browser tests: a fake camera file, headless Chromium, state screenshots.

Chromium is the Debian package (``/usr/bin/chromium``) driven by Playwright's Python package;
``playwright install`` is never used. Missing either is a test failure with a message (CI
installs both: ``scripts/install-system-deps`` and the ``dev`` extra), never a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.streamgen import write_y4m
from pipeline.types import ImageArray
from tests.e2e import camera_frames

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
VIEWPORT = {"width": 1024, "height": 600}
WAIT_MS = 30_000  # the longest any single wait may take

# Injected by the tests (never shipped in the page): every data-state the body takes, in
# order, so a state that lasts only a few milliseconds (a fast capture) is still on record.
# attributeOldValue recovers states that changed twice before the observer ran.
STATE_HISTORY_JS = """
(() => {
  const seen = (window.__fpStates = []);
  const note = (s) => { if (s && seen[seen.length - 1] !== s) seen.push(s); };
  new MutationObserver((records) => {
    for (const r of records) if (r.target === document.body) note(r.oldValue);
    note(document.body && document.body.dataset.state);
  }).observe(document, {
    subtree: true, attributes: true, attributeFilter: ["data-state"], attributeOldValue: true,
  });
})();
"""

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
]


def require_browser() -> Any:
    """Playwright's async API, or a clear failure saying what to install."""
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: run scripts/install-system-deps "
            "(Debian package 'chromium')",
            pytrace=False,
        )
    try:
        from playwright import async_api
    except ImportError:
        pytest.fail(
            "the Python package 'playwright' is missing: pip install -e '.[dev]' "
            "(never 'playwright install': the tests use the system Chromium)",
            pytrace=False,
        )
    return async_api


def write_camera(
    analyzer: Any, photo: ImageArray, path: Path, seconds: float = 6, fps: float = 15
) -> Path:
    """A y4m fake-camera file: a camera view of the photo's largest face (Chromium loops it)."""
    write_y4m(camera_frames(analyzer, photo, seconds=seconds, fps=fps), path, fps)
    return path


class StateShots:
    """Screenshot the page once per distinct ``body[data-state]`` it shows.

    Polls (every 100 ms) rather than hooking the page, so the page code carries nothing
    test-specific. Very short states can be missed; the tests wait explicitly for the ones
    that matter.
    """

    def __init__(self, page: Any, prefix: str) -> None:
        self.page = page
        self.prefix = prefix
        self.seen: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def shot(self, state: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(SCREENSHOTS / f"{self.prefix}-{state}.png"))
        if state not in self.seen:
            self.seen.append(state)

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # navigation or closing in between
                state = await self.page.evaluate("document.body && document.body.dataset.state")
                # "idle" is the HTML's state before the page script ran: nothing to see.
                if state and state != "idle" and state not in self.seen:
                    await self.shot(state)
            await asyncio.sleep(0.1)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@contextlib.asynccontextmanager
async def browser_page(user_dir: Path, camera: Path | None) -> AsyncIterator[Any]:
    """One fresh Chromium (own user-data dir) with ``camera`` as its fake webcam; one page.

    ``camera=None``: a machine without any camera (headless Chromium has none).

    The page's console errors are collected on ``page.console_errors`` (CSP violations show
    up there).
    """
    async_api = require_browser()
    args = list(CHROMIUM_FLAGS)
    if camera is not None:
        args += [
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={camera}",
        ]
    async with async_api.async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(user_dir),
            executable_path=CHROMIUM,
            args=args,
            viewport=VIEWPORT,
            timeout=WAIT_MS,
        )
        try:
            context.set_default_timeout(WAIT_MS)
            await context.add_init_script(script=STATE_HISTORY_JS)
            page = context.pages[0] if context.pages else await context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.console_errors = errors
            yield page
        finally:
            await context.close()


async def wait_state(page: Any, state: str, timeout_ms: int = WAIT_MS) -> None:
    """Wait for ``body[data-state=state]``; on timeout, say which state the page was in."""
    try:
        await page.wait_for_selector(f'body[data-state="{state}"]', timeout=timeout_ms)
    except Exception as exc:
        now = await page.evaluate("document.body.dataset.state")
        text = await page.evaluate("document.body.innerText")
        raise AssertionError(
            f"page never reached data-state={state!r} (it is {now!r}); page text:\n{text}\n"
            f"console errors: {page.console_errors}"
        ) from exc


async def state_history(page: Any) -> list[str]:
    """Every ``data-state`` the current page has shown, in order (see STATE_HISTORY_JS)."""
    return list(await page.evaluate("window.__fpStates || []"))


async def wait_seen(page: Any, state: str, timeout_ms: int = WAIT_MS) -> None:
    """Wait until the page has shown ``state`` at some point, however briefly."""
    try:
        await page.wait_for_function(
            "s => (window.__fpStates || []).includes(s)", arg=state, timeout=timeout_ms
        )
    except Exception as exc:
        raise AssertionError(
            f"page never showed data-state={state!r}; it went through "
            f"{await state_history(page)}; console errors: {page.console_errors}"
        ) from exc


def csp_violations(page: Any) -> list[str]:
    return [e for e in page.console_errors if "Content Security Policy" in e]
