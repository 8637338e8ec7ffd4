"""The demo web client in a real headless Chromium against a real server.

Real WebRTC on 127.0.0.1 (Chromium's fake camera plays a y4m camera view of a test photo),
real Redis and models. Each test saves a screenshot per page state it passes through into
docs/screenshots/<page>-<state>.png (1024x600).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from pipeline.errors import NotFound
from stream_server.app import CONFIG, CONNECTIONS, EXECUTOR, LIMITER
from tests.browser import (
    SCREENSHOTS,
    StateShots,
    browser_page,
    csp_violations,
    state_history,
    wait_seen,
    wait_state,
    write_camera,
)
from tests.e2e import PASSPHRASE
from tests.faultkit import fail_payment_writes

ENROLL = "faces/obama/obama.jpg"
SHOPPER = "faces/obama/obama3.jpg"  # another photo of the enrolled person
ATTACK = "spoof/image_F1.jpg"  # a printed photo held up to the camera


pytestmark = pytest.mark.usefixtures("loopback_ice")


@pytest.fixture
async def env(make_env):
    return await make_env()


def _url(env, path: str) -> str:
    return str(env.server.make_url(path))


async def _no_video_arrives(env) -> Any:
    """The page's one connection receives no frame (decoded or not) for 1.5 s; returns it."""
    [conn] = list(env.app[CONNECTIONS])
    await asyncio.sleep(0.5)  # frames already in flight
    arrived = conn.ingest.frames + conn.ingest.undecoded
    await asyncio.sleep(1.5)
    assert conn.ingest.frames + conn.ingest.undecoded == arrived
    return conn


OFFER = "Join our membership: 5% off every visit"


async def test_checkout_with_passphrase_is_approved(make_env, analyzer, photo, tmp_path):
    env = await make_env(offer_text=OFFER)
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    camera = write_camera(analyzer, photo(SHOPPER), tmp_path / "cam.y4m")
    async with browser_page(tmp_path / "profile", camera) as page:
        await page.add_init_script(script=PEERS_JS)
        shots = StateShots(page, "checkout")
        shots.start()
        try:
            await page.goto(_url(env, f"/checkout#token={env.token}&amount=12.50&order=o-1"))
            await wait_state(page, "confirm")
            # Recognised: no more video is sent while the shopper types the passphrase.
            await page.wait_for_selector("body[data-video=paused]")
            assert await page.text_content("#confirm-account") == "B***********"
            assert "12.50" in await page.text_content("#confirm-amount")
            field = page.locator("input[type=password]")
            await field.fill(PASSPHRASE)
            await field.press("Enter")
            await wait_state(page, "approved")
            await shots.shot("approved")
            assert "paid by B***********" in await page.text_content("#result-detail")
            await page.wait_for_selector("#offer:not([hidden])")
            assert await page.text_content("#offer") == OFFER
            await shots.shot("approved")
            payments = await env.payments()
            assert len(payments) == 1
            # Between shoppers the page sends no video either: the server receives no frame
            # at all (decoded or not) while the result is up.
            assert await page.get_attribute("body", "data-video") == "paused"
            conn = await _no_video_arrives(env)
            decoded = conn.ingest.frames
            # "New sale" starts the next checkout on the same connection (seen here on a
            # phone-sized screen); cancel it.
            await page.set_viewport_size({"width": 390, "height": 844})
            await page.click("#new-sale")
            await wait_state(page, "confirm")  # found the shopper again: the video restarted
            assert conn.ingest.frames > decoded
            # The cap asked for after the answer outlived pausing and resuming the video.
            assert (await page.evaluate(SENDER_JS))["caps"] == [15]
            await page.screenshot(path=str(SCREENSHOTS / "checkout-confirm-phone.png"))
            await page.click("#screen-confirm [data-action=cancel]")
            await wait_state(page, "cancelled")
            await shots.shot("cancelled")
            assert len(await env.payments()) == 1
        finally:
            await shots.stop()
        assert csp_violations(page) == []
    assert {"scanning", "confirm", "approved", "cancelled"} <= set(shots.seen), shots.seen


async def test_keypad_wrong_passphrase_and_a_dropped_socket(env, analyzer, photo, tmp_path):
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    camera = write_camera(analyzer, photo(SHOPPER), tmp_path / "cam.y4m")
    async with browser_page(tmp_path / "profile", camera) as page:
        await page.goto(_url(env, f"/checkout#token={env.token}&amount=7.00&order=o-k"))
        await wait_state(page, "confirm")
        # The server drops the socket mid-prompt: nothing is charged, the page says so,
        # reconnects and runs the same order again.
        for conn in list(env.app[CONNECTIONS]):
            await conn.ws.close()
        await wait_state(page, "connecting")
        assert "Reconnecting" in await page.text_content("#status")
        await wait_state(page, "confirm")
        assert await page.text_content("#order") == "o-k"
        # A wrong passphrase typed on the on-screen keypad: attempts left are shown.
        for key in "1234":
            await page.click(f"#keypad button[data-key='{key}']")
        assert await page.input_value("input[type=password]") == "1234"
        await page.click("#pay")
        await page.wait_for_selector('#wrong:has-text("2 attempt(s) left")')
        await page.screenshot(path=str(SCREENSHOTS / "checkout-wrong_passphrase.png"))
        await page.fill("input[type=password]", PASSPHRASE)
        await page.press("input[type=password]", "Enter")
        await wait_state(page, "approved")
        assert csp_violations(page) == []
    assert len(await env.payments()) == 1


async def test_lost_video_is_offered_again_without_leaving_the_prompt(
    env, analyzer, photo, tmp_path
):
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    camera = write_camera(analyzer, photo(SHOPPER), tmp_path / "cam.y4m")
    async with browser_page(tmp_path / "profile", camera) as page:
        await page.goto(_url(env, f"/checkout#token={env.token}&amount=5.00&order=o-v"))
        await wait_state(page, "confirm")
        [conn] = list(env.app[CONNECTIONS])
        lost = conn.ingest
        # What aiortc does when ICE consent or DTLS fails: the server's video ends by
        # itself, the socket stays, and the server says video_lost.
        lost._ended_by_peer()
        for _ in range(150):  # the page re-offers after 1 s; bounded wait (15 s)
            if conn.ingest is not lost:
                break
            await asyncio.sleep(0.1)
        assert conn.ingest is not lost, "the page never offered new video"
        # The prompt stayed up the whole time, and the sale goes on.
        assert await page.get_attribute("body", "data-state") == "confirm"
        await page.fill("input[type=password]", PASSPHRASE)
        await page.press("input[type=password]", "Enter")
        await wait_state(page, "approved")
        # The next sale is decided on the new video connection.
        await page.click("#new-sale")
        await wait_state(page, "confirm")
        await page.click("#screen-confirm [data-action=cancel]")
        await wait_state(page, "cancelled")
        # Nothing between the first prompt and its approval went back to a start screen.
        history = await state_history(page)
        between = history[history.index("confirm") + 1 : history.index("approved")]
        assert not {"idle", "connecting", "scanning"} & set(between), history
        assert csp_violations(page) == []
    assert len(await env.payments()) == 1


async def test_no_camera_says_so(env, tmp_path):
    async with browser_page(tmp_path / "profile", None) as page:
        await page.goto(_url(env, f"/checkout#token={env.token}&amount=1.00&order=o-n"))
        await wait_state(page, "error")
        await page.screenshot(path=str(SCREENSHOTS / "checkout-no-camera.png"))
        assert "camera" in (await page.text_content("#error-detail")).lower()


async def test_print_attack_shows_the_declined_screen(env, analyzer, photo, tmp_path):
    # Enrol the attacked person's own photo: even a perfect match must not pay.
    await env.enroll("acct-victim", "Victim Person", "+86 138 0000 1234", photo(ATTACK))
    camera = write_camera(analyzer, photo(ATTACK), tmp_path / "cam.y4m")
    async with browser_page(tmp_path / "profile", camera) as page:
        shots = StateShots(page, "checkout-spoof")
        shots.start()
        try:
            await page.goto(_url(env, f"/checkout#token={env.token}&amount=5.00&order=o-2"))
            await wait_state(page, "declined")
            await shots.shot("declined")
            detail = await page.text_content("#result-detail")
            assert "real face, not a photo or screen" in detail
        finally:
            await shots.stop()
        assert csp_violations(page) == []
    assert await env.payments() == []


async def test_gate_opens_for_an_enrolled_person(env, analyzer, photo, tmp_path):
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    _, token = await env.store.add_terminal(env.merchant.merchant_id, "gate")
    camera = write_camera(analyzer, photo(SHOPPER), tmp_path / "cam.y4m")
    async with browser_page(tmp_path / "profile", camera) as page:
        shots = StateShots(page, "gate")
        shots.start()
        try:
            await page.goto(_url(env, f"/gate#token={token}"))
            # (wait_for_function would need 'unsafe-eval', which the page's CSP refuses)
            await page.wait_for_selector("#decisions li.open", timeout=30_000)
            await shots.shot("gate_open")
            assert await page.text_content("#counter") == "1"
            entry = await page.text_content("#decisions li.open")
            assert "B***********" in entry and " ms" in entry
            # The server drops the socket: the page says so and reconnects by itself.
            for conn in list(env.app[CONNECTIONS]):
                await conn.ws.close()
            await wait_state(page, "connecting")
            await shots.shot("reconnecting")
            assert "Reconnecting" in await page.text_content("#conn")
            await wait_state(page, "scanning")
            await page.wait_for_selector('#conn:text-is("Connected")')
        finally:
            await shots.stop()
        assert csp_violations(page) == []
    assert len(await env.payments()) == 1


# Injected by the test (never shipped in the page): the page's peer connections, newest last.
PEERS_JS = """
(() => {
  const Native = window.RTCPeerConnection;
  const peers = (window.__fpPeers = []);
  window.RTCPeerConnection = class extends Native {
    constructor(...args) { super(...args); peers.push(this); }
  };
})();
"""

# What the newest peer connection's video sender encodes: the maxFramerate of each encoding
# ("unset": none, the camera's full rate) and the frames sent so far.
SENDER_JS = """
async () => {
  const pc = window.__fpPeers[window.__fpPeers.length - 1];
  const sender = pc.getSenders().find((s) => s.track && s.track.kind === "video");
  const caps = sender.getParameters().encodings.map(
    (e) => (e.maxFramerate === undefined ? "unset" : e.maxFramerate));
  let sent = 0;
  for (const r of (await sender.getStats()).values()) {
    if (r.type === "outbound-rtp") sent += r.framesSent;
  }
  return { peers: window.__fpPeers.length, caps, sent };
}
"""


async def _frames_sent_per_s(page, seconds: float = 2.0) -> float:
    """The frame rate the page's video sender sends, measured over ``seconds``."""
    before = (await page.evaluate(SENDER_JS))["sent"]
    await asyncio.sleep(seconds)
    return ((await page.evaluate(SENDER_JS))["sent"] - before) / seconds


async def test_gate_camera_lowers_and_restores_its_frame_rate(env, analyzer, photo, tmp_path):
    """The server's ``{"type": "camera", "max_fps": N}`` caps the gate's video sender at N
    frames a second, ``max_fps: null`` lifts the cap; the video flows throughout, and a new
    video connection starts at the full rate. The messages go out through the server's own
    socket (not its idle timing, which tests/test_gate_e2e.py covers)."""
    _, token = await env.store.add_terminal(env.merchant.merchant_id, "gate")
    # 30 fps like a gate camera: a cap of 10 is plain in the frames sent.
    camera = write_camera(analyzer, photo(SHOPPER), tmp_path / "cam.y4m", fps=30)
    async with browser_page(tmp_path / "profile", camera) as page:
        await page.add_init_script(script=PEERS_JS)
        await page.goto(_url(env, f"/gate#token={token}"))
        await wait_state(page, "scanning")
        await page.wait_for_selector("body[data-camera=full]")
        [conn] = list(env.app[CONNECTIONS])
        assert (await page.evaluate(SENDER_JS))["caps"] == ["unset"]
        full = await _frames_sent_per_s(page)

        await conn.send({"type": "camera", "max_fps": 10})
        await page.wait_for_selector("body[data-camera=idle]")
        assert (await page.evaluate(SENDER_JS))["caps"] == [10]
        capped = await _frames_sent_per_s(page)
        # Still sending, and the server still receives: capped, not paused.
        arrived = conn.ingest.frames + conn.ingest.undecoded
        for _ in range(50):  # bounded wait (5 s)
            if conn.ingest.frames + conn.ingest.undecoded > arrived + 5:
                break
            await asyncio.sleep(0.1)
        assert conn.ingest.frames + conn.ingest.undecoded > arrived + 5
        assert 0 < capped <= 15 < full, (capped, full)

        await conn.send({"type": "camera", "max_fps": None})
        await page.wait_for_selector("body[data-camera=full]")
        assert (await page.evaluate(SENDER_JS))["caps"] == ["unset"]
        assert await _frames_sent_per_s(page) > 15

        # Capped, then the socket drops: the next video connection sends its full rate.
        await conn.send({"type": "camera", "max_fps": 10})
        await page.wait_for_selector("body[data-camera=idle]")
        await conn.ws.close()
        await wait_state(page, "connecting")
        await wait_state(page, "scanning")
        await page.wait_for_selector("body[data-camera=full]")
        sender = await page.evaluate(SENDER_JS)
        assert sender["peers"] == 2 and sender["caps"] == ["unset"], sender

        # A browser that refuses the cap only warns, and keeps sending its full rate.
        warnings: list[str] = []
        page.on("console", lambda m: warnings.append(m.text) if m.type == "warning" else None)
        await page.evaluate(
            "() => { RTCRtpSender.prototype.setParameters = () =>"
            " Promise.reject(new DOMException('unsupported', 'InvalidModificationError')); }"
        )
        [conn] = list(env.app[CONNECTIONS])
        await conn.send({"type": "camera", "max_fps": 10})
        for _ in range(50):  # bounded wait (5 s)
            if any("cap the video at 10 fps" in w for w in warnings):
                break
            await asyncio.sleep(0.1)
        assert any("cap the video at 10 fps" in w for w in warnings), warnings
        assert await page.get_attribute("body", "data-camera") == "full"
        assert (await page.evaluate(SENDER_JS))["caps"] == ["unset"]
        assert await _frames_sent_per_s(page) > 15
        assert csp_violations(page) == []
        assert page.console_errors == []


async def _caps_become(page, caps: list[Any], seconds: float = 5.0) -> None:
    """Wait (bounded) until the page's video sender's maxFramerate is ``caps``."""
    for _ in range(int(seconds * 10)):
        if (await page.evaluate(SENDER_JS))["caps"] == caps:
            return
        await asyncio.sleep(0.1)
    assert (await page.evaluate(SENDER_JS))["caps"] == caps


@contextlib.asynccontextmanager
async def _capped_checkout(env, analyzer, tmp_path, seed: int, order: str) -> AsyncIterator[Any]:
    """A checkout page scanning a blank 30 fps camera (random pixels from ``seed``), once
    the server's cap of 15 is on its video sender."""
    nobody = np.random.default_rng(seed).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    camera = write_camera(analyzer, nobody, tmp_path / "cam.y4m", fps=30)
    async with browser_page(tmp_path / "profile", camera) as page:
        await page.add_init_script(script=PEERS_JS)
        await page.goto(_url(env, f"/checkout#token={env.token}&amount=1.00&order={order}"))
        await wait_state(page, "scanning")
        await _caps_become(page, [15])
        yield page


async def test_checkout_camera_is_capped_right_after_the_answer(env, analyzer, tmp_path):
    """A browser's camera sends 30 fps; a checkout needs about 15 (``checkout.camera_fps``),
    which the server asks for right after its answer. The page applies the cap although the
    request follows the answer at once (the page handles messages concurrently, and a cap
    set before the answer is applied would be dropped), and the video still flows."""
    async with _capped_checkout(env, analyzer, tmp_path, 0, "o-cap") as page:
        assert 0 < await _frames_sent_per_s(page) <= 17
        assert csp_violations(page) == []


async def test_checkout_camera_follows_load_pacing_mid_scan_and_after_a_rush(
    env, analyzer, tmp_path
):
    """An overloaded server asks a scanning checkout's camera for fewer frames
    (``checkout.load_pacing``): Chromium sends about 5 a second while the checkout goes on.
    After the rush, the next sale starts at the full rate again (``restart_full``)."""
    async with _capped_checkout(env, analyzer, tmp_path, 1, "o-rush") as page:
        await asyncio.sleep(1.0)  # a started camera takes about a second to reach its rate
        assert 10 < await _frames_sent_per_s(page) <= 17
        # Real load: both workers busy for 3.5 s, as in tests/test_checkout_e2e.py.
        loop = asyncio.get_running_loop()
        busy = [loop.run_in_executor(env.app[EXECUTOR], time.sleep, 3.5) for _ in range(2)]
        await _caps_become(page, [5])
        assert await page.get_attribute("body", "data-state") == "scanning"
        assert 0 < await _frames_sent_per_s(page, 1.0) <= 7
        await page.click("#cancel-scan")
        await wait_state(page, "cancelled")
        await asyncio.gather(*busy)
        await asyncio.sleep(3.0)  # calm again
        await page.click("#new-sale")
        await wait_state(page, "scanning")
        await _caps_become(page, [15], seconds=2.0)  # not 7.5 first: no step per window
        await asyncio.sleep(1.0)  # the resumed camera reaching its rate
        assert 10 < await _frames_sent_per_s(page) <= 17
        assert csp_violations(page) == []
        assert page.console_errors == []


async def test_bad_token_and_missing_token_say_so(env, tmp_path):
    async with browser_page(tmp_path / "profile", None) as page:
        shots = StateShots(page, "checkout-no-token")
        await page.goto(_url(env, "/checkout"))
        await wait_state(page, "error")
        await shots.shot("error")
        assert "No terminal token" in await page.text_content("#error-detail")
        await page.goto(_url(env, "/checkout#token=fpt_wrong&amount=1.00&order=o-9"))
        await page.reload()  # a fragment-only change does not reload the page
        await wait_state(page, "error")
        assert "token was refused" in await page.text_content("#error-detail")
        # The landing page builds the provisioned links from its fields.
        await page.goto(_url(env, "/"))
        await page.fill("#token", "fpt_abc")
        href = await page.get_attribute("#link-checkout", "href")
        assert href == "/checkout#token=fpt_abc&amount=12.50&order=order-1"
        await StateShots(page, "index").shot("links")
        assert csp_violations(page) == []


async def test_enrolment_with_consent_then_the_new_account_pays(env, analyzer, photo, tmp_path):
    _, token = await env.store.add_terminal(env.merchant.merchant_id, "enroll")
    camera = write_camera(analyzer, photo(ENROLL), tmp_path / "enrol.y4m")
    async with browser_page(tmp_path / "profile", camera) as page:
        await page.add_init_script(script=PEERS_JS)
        shots = StateShots(page, "enroll")
        shots.start()
        try:
            await page.goto(_url(env, f"/enroll#token={token}"))
            await wait_state(page, "consent")
            await shots.shot("consent")
            # Nothing touches the camera before the person agrees.
            assert await page.evaluate("document.getElementById('preview').srcObject === null")
            await page.click("#agree")
            await wait_state(page, "details")
            await page.fill("#account", "acct-new")
            await page.fill("#name", "Barack Obama")
            await page.fill("#phone", "+1 202 555 0101")
            await shots.shot("details")
            await page.press("#phone", "Enter")
            # A good capture can be over in a few frames: capturing may already be past.
            await wait_seen(page, "capturing")
            # The first enroll_feedback reached the page (its screen may be hidden by now).
            await page.wait_for_selector("#hint[data-hint]", state="attached")
            if await page.get_attribute("body", "data-state") == "capturing":
                await shots.shot("capturing")
            await wait_state(page, "passphrase")
            await shots.shot("passphrase")
            # The capture is over: the camera is off, and the server receives no more video
            # while the person types.
            assert await page.evaluate("document.getElementById('preview').srcObject === null")
            await _no_video_arrives(env)
            # The capture ran capped at the server's request (enrollment.camera_fps).
            assert (await page.evaluate(SENDER_JS))["caps"] == [15]
            await page.fill("#pass1", PASSPHRASE)
            await page.fill("#pass2", PASSPHRASE)
            await page.press("#pass2", "Enter")
            await wait_state(page, "enrolled")
            await shots.shot("enrolled")
            assert "acct-new" in await page.text_content("#result-detail")
            history = await state_history(page)
        finally:
            await shots.stop()
        assert csp_violations(page) == []
    steps = ["consent", "details", "capturing", "passphrase", "enrolled"]
    assert [s for s in history if s in steps] == steps, history
    # The new account pays at a checkout kiosk with another photo of the same person.
    camera = write_camera(analyzer, photo(SHOPPER), tmp_path / "shop.y4m")
    async with browser_page(tmp_path / "profile2", camera) as page:
        await page.goto(_url(env, f"/checkout#token={env.token}&amount=4.20&order=o-e"))
        await wait_state(page, "confirm")
        await page.fill("input[type=password]", PASSPHRASE)
        await page.press("input[type=password]", "Enter")
        await wait_state(page, "approved")
    payments = await env.payments()
    assert len(payments) == 1


def _record_sent(page) -> list[dict[str, Any]]:
    """Every JSON message the page sends on its WebSockets, in order (filled as they go)."""
    sent: list[dict[str, Any]] = []

    def on_frame(payload: str | bytes) -> None:
        with contextlib.suppress(ValueError):
            sent.append(json.loads(payload))

    page.on("websocket", lambda ws: ws.on("framesent", on_frame))
    return sent


def _sent(sent: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in sent if m.get("type") == kind]


async def test_pay_pay_enter_sends_one_passphrase_and_clears_the_field(
    env, analyzer, photo, tmp_path
):
    """Pay, Pay and Enter in one go send the answer once; the field is emptied and locked
    at once (the passphrase does not stay in the page) and unlocked by the reply."""
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    camera = write_camera(analyzer, photo(SHOPPER), tmp_path / "cam.y4m")
    async with browser_page(tmp_path / "profile", camera) as page:
        sent = _record_sent(page)
        await page.goto(_url(env, f"/checkout#token={env.token}&amount=3.00&order=o-twice"))
        await wait_state(page, "confirm")
        await page.fill("#passphrase", "not-the-passphrase")
        # Both clicks and the Enter (a submit) before the server can answer.
        after = await page.evaluate(
            """() => {
              const pay = document.getElementById("pay");
              pay.click();
              pay.click();
              document.getElementById("screen-confirm").requestSubmit();
              const field = document.getElementById("passphrase");
              return { value: field.value, locked: field.disabled && pay.disabled };
            }"""
        )
        assert after == {"value": "", "locked": True}
        await page.wait_for_selector('#wrong:has-text("2 attempt(s) left")')
        assert len(_sent(sent, "passphrase")) == 1, sent
        # The reply unlocked the field: the right passphrase pays.
        assert await page.is_enabled("#passphrase") and await page.is_enabled("#pay")
        await page.fill("#passphrase", PASSPHRASE)
        await page.press("#passphrase", "Enter")
        await wait_state(page, "approved")
        assert await page.input_value("#passphrase") == ""
        assert len(_sent(sent, "passphrase")) == 2, sent
        assert csp_violations(page) == []
    assert len(await env.payments()) == 1


async def test_payment_unknown_checks_again_with_the_same_order(
    env, analyzer, photo, tmp_path, monkeypatch
):
    """Redis fails while the payment is written and cannot say whether it was: the page
    says the status is unknown (not declined) and "Check again" asks with the SAME order,
    which the server answers "already paid" (nothing charged twice)."""
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    fail_payment_writes(monkeypatch, env.store, written=True, lookup_fails=True)
    camera = write_camera(analyzer, photo(SHOPPER), tmp_path / "cam.y4m")
    async with browser_page(tmp_path / "profile", camera) as page:
        sent = _record_sent(page)
        shots = StateShots(page, "checkout")
        await page.goto(_url(env, f"/checkout#token={env.token}&amount=6.60&order=o-unk"))
        await wait_state(page, "confirm")
        await page.fill("#passphrase", PASSPHRASE)
        await page.press("#passphrase", "Enter")
        await wait_state(page, "payment_unknown")
        await shots.shot("payment_unknown")
        assert await page.text_content("#result-title") == "Payment status unknown"
        assert "declined" not in (await page.text_content("#screen-result")).lower()
        assert await page.is_visible("#retry")
        assert await page.text_content("#retry") == "Check again"
        assert await page.get_attribute("#new-sale", "class") != "primary"
        monkeypatch.undo()  # Redis answers again
        await page.click("#retry")
        await wait_state(page, "already_paid")
        await shots.shot("already_paid")
        paid = await env.store.find_payment(env.merchant.merchant_id, "o-unk")
        assert paid is not None
        assert await page.text_content("#result-title") == "This order is already paid"
        detail = await page.text_content("#result-detail")
        assert paid.payment_id in detail and "Nothing more was charged" in detail
        starts = _sent(sent, "start_checkout")
        assert [(m["order_id"], m["amount"]) for m in starts] == [("o-unk", "6.60")] * 2
        assert await page.text_content("#order") == "o-unk"
        assert csp_violations(page) == []
    assert len(await env.payments()) == 1


async def test_a_refused_start_offers_retry_after_the_wait_with_the_same_order(
    make_env, analyzer, tmp_path
):
    """One checkout start per 4 s: the next sale is refused (rate_limited). The page shows
    it with a Retry button, disabled with a countdown until ``retry_after_s``, that starts
    the same order again."""
    env = await make_env(limits={"session_starts_per_terminal": {"count": 1, "window_s": 4}})
    nobody = np.random.default_rng(2).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    camera = write_camera(analyzer, nobody, tmp_path / "cam.y4m")
    async with browser_page(tmp_path / "profile", camera) as page:
        sent = _record_sent(page)
        shots = StateShots(page, "checkout")
        await page.goto(_url(env, f"/checkout#token={env.token}&amount=2.00&order=o-r1"))
        await wait_state(page, "scanning")
        await page.click("#cancel-scan")
        await wait_state(page, "cancelled")
        await page.click("#new-sale")
        await wait_state(page, "refused")
        await shots.shot("refused")
        assert await page.is_visible("#retry")
        assert await page.is_disabled("#retry")
        assert re.fullmatch(r"Retry \([1-4] s\)", await page.text_content("#retry"))
        assert "Too many payments" in await page.text_content("#result-detail")
        refused = _sent(sent, "start_checkout")[-1]["order_id"]
        assert refused != "o-r1" and await page.text_content("#order") == refused
        await page.wait_for_selector("#retry:enabled", timeout=8_000)
        assert await page.text_content("#retry") == "Retry"
        await page.click("#retry")
        await wait_state(page, "scanning")
        orders = [m["order_id"] for m in _sent(sent, "start_checkout")]
        assert orders == ["o-r1", refused, refused], orders
        await page.click("#cancel-scan")
        await wait_state(page, "cancelled")
        assert csp_violations(page) == []


async def test_an_amount_the_server_would_refuse_is_refused_by_the_page(env, tmp_path):
    async with browser_page(tmp_path / "profile", None) as page:
        sockets: list[Any] = []
        page.on("websocket", lambda ws: sockets.append(ws))
        for amount in ("0", "0.00", "1.234", "12345678901234"):
            await page.goto(_url(env, f"/checkout#token={env.token}&amount={amount}&order=o-a"))
            await page.reload()  # a fragment-only change does not reload the page
            await wait_state(page, "error")
            detail = await page.text_content("#error-detail")
            assert "more than 0 with at most two decimals" in detail, (amount, detail)
        assert sockets == []  # never connected, nothing sent
        assert csp_violations(page) == []


# Injected by the tests (never shipped in the page): every camera stream the page opened.
STREAMS_JS = """
(() => {
  const streams = (window.__fpStreams = []);
  const md = navigator.mediaDevices;
  const open = md.getUserMedia.bind(md);
  md.getUserMedia = async (c) => { const s = await open(c); streams.push(s); return s; };
})();
"""

# [every track's readyState] per stream the page opened, and whether the preview shows one.
CAMERA_JS = """
() => ({
  streams: window.__fpStreams.map((s) => s.getTracks().map((t) => t.readyState)),
  preview: document.getElementById("preview").srcObject !== null,
})
"""


async def test_enrolment_refused_phone_or_start_returns_to_details_camera_off(
    make_env, analyzer, photo, tmp_path
):
    """A phone the server would refuse is refused by the page before the camera is asked
    for; a start the server refuses (a rate limit) turns the camera off and goes back to
    the details with the reason."""
    env = await make_env(limits={"enrolments_per_account": {"count": 1, "window_s": 3600}})
    _, token = await env.store.add_terminal(env.merchant.merchant_id, "enroll")
    limit = env.app[CONFIG].limits.enrolments_per_account
    await env.app[LIMITER].hit("enrolments_per_account", "acct-busy", limit)  # used up
    camera = write_camera(analyzer, photo(ENROLL), tmp_path / "enrol.y4m")
    async with browser_page(tmp_path / "profile", camera) as page:
        await page.add_init_script(script=STREAMS_JS)
        sent = _record_sent(page)
        await page.goto(_url(env, f"/enroll#token={token}"))
        await page.click("#agree")
        await wait_state(page, "details")
        await page.fill("#account", "acct-busy")
        await page.fill("#name", "Barack Obama")
        await page.fill("#phone", "call me")
        await page.press("#phone", "Enter")
        await page.wait_for_selector("#details-error:not([hidden])")
        assert "phone number" in await page.text_content("#details-error")
        assert await page.get_attribute("body", "data-state") == "details"
        assert await page.evaluate(CAMERA_JS) == {"streams": [], "preview": False}
        assert sent == []
        # A good phone, but the server refuses the start: back to the details, camera off.
        await page.fill("#phone", "+1 (202) 555-0101")
        await page.press("#phone", "Enter")
        await wait_seen(page, "connecting")
        await page.wait_for_selector('#details-error:has-text("Too many enrolments")')
        await wait_state(page, "details")
        assert _sent(sent, "start_enroll")[0]["phone"] == "+1 (202) 555-0101"
        camera_now = await page.evaluate(CAMERA_JS)
        assert camera_now["streams"] and not camera_now["preview"], camera_now
        assert all(s == ["ended"] for s in camera_now["streams"]), camera_now
        assert not _sent(sent, "cancel")  # nothing ran on the server to cancel
        assert csp_violations(page) == []
    with pytest.raises(NotFound):
        await env.store.get_account("acct-busy")


async def test_cancel_on_the_enrolment_passphrase_screen_creates_no_account(
    make_env, analyzer, photo, tmp_path
):
    env = await make_env()
    _, token = await env.store.add_terminal(env.merchant.merchant_id, "enroll")
    camera = write_camera(analyzer, photo(ENROLL), tmp_path / "enrol.y4m")
    async with browser_page(tmp_path / "profile", camera) as page:
        sent = _record_sent(page)
        await page.goto(_url(env, f"/enroll#token={token}"))
        await page.click("#agree")
        await page.fill("#account", "acct-cancel")
        await page.fill("#name", "Barack Obama")
        await page.fill("#phone", "+1 202 555 0101")
        await page.press("#phone", "Enter")
        await wait_state(page, "passphrase")
        await page.fill("#pass1", PASSPHRASE)  # half typed, then the person changes their mind
        await page.click("#cancel-pass")
        await wait_state(page, "cancelled")
        assert "Nothing was stored" in await page.text_content("#result-detail")
        assert await page.input_value("#pass1") == ""
        assert len(_sent(sent, "cancel")) == 1 and not _sent(sent, "enroll_passphrase")
        assert csp_violations(page) == []
    with pytest.raises(NotFound):
        await env.store.get_account("acct-cancel")
    assert await env.payments() == []
