"""Checkout end to end: real WebRTC on 127.0.0.1, real Redis, real models, real photos."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from stream_server import replay
from stream_server.app import CONNECTIONS, DIRECTORY, EXECUTOR, REDIS
from tests.e2e import PASSPHRASE, camera_frames, empty_frames

ENROLL = "faces/obama/obama.jpg"
SHOPPER = "faces/obama/obama3.jpg"  # another photo of the enrolled person


pytestmark = pytest.mark.usefixtures("loopback_ice")


async def _shopper_session(env, analyzer, photo, order="o-1", amount="12.50", rel=SHOPPER, seed=0):
    term = await env.terminal()
    await term.start_video(camera_frames(analyzer, photo(rel), seed=seed))
    state = await term.checkout(amount, order)
    assert state["state"] == "scanning"
    return term


async def test_enrolled_shopper_pays_once(make_env, analyzer, photo):
    env = await make_env()
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    term = await _shopper_session(env, analyzer, photo)
    confirm = await term.expect("confirm", "declined")
    assert confirm["type"] == "confirm", term.events
    assert confirm["account"] == "B***********"
    assert confirm["amount"] == "12.50" and 0 < confirm["expires_in_s"] <= 30
    await term.send(
        {"type": "passphrase", "prompt_id": confirm["prompt_id"], "passphrase": PASSPHRASE}
    )
    approved = await term.expect("approved", "declined")
    assert approved["type"] == "approved", term.events
    assert (await term.until_end())["state"] == "approved"
    # The finished checkout keeps nothing of the shopper's face while the kiosk waits.
    (conn,) = env.app[CONNECTIONS]
    await asyncio.wait_for(conn.session_task, 5)
    assert conn.session.stream.frames == 0 and conn.session.stream.evidence == {}
    assert len(await env.payments()) == 1
    payment = await env.store.get_payment(approved["payment_id"])
    assert payment.account_id == "acct-obama" and payment.amount == 1250
    assert payment.merchant_id == env.merchant.merchant_id
    # The same terminal can run the next checkout on the same connection and video.
    await term.checkout("3.00", "o-2")
    confirm2 = await term.expect("confirm")
    assert confirm2["amount"] == "3.00"
    await term.send({"type": "cancel"})
    assert (await term.until_end())["state"] == "cancelled"
    assert len(await env.payments()) == 1


async def test_the_gallery_search_runs_in_its_own_thread(make_env, analyzer, photo, monkeypatch):
    """A search at a million templates takes up to ~6 ms, longer while an index rebuild's
    step holds the gallery lock: it used to run on the event loop and stall every
    terminal's packets and messages meanwhile. Nor may it queue behind the inference pool."""
    env = await make_env()
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    directory = env.app[DIRECTORY]
    identify = directory.identify
    threads = []

    def recorded(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return identify(*args, **kwargs)

    monkeypatch.setattr(directory, "identify", recorded)
    term = await _shopper_session(env, analyzer, photo)
    assert (await term.expect("confirm", "declined"))["type"] == "confirm", term.events
    assert threads and all(name.startswith("facepay-search") for name in threads), threads


async def test_a_checkout_camera_is_capped_at_the_rate_its_evidence_needs(
    make_env, analyzer, photo
):
    """Right after each answer the server asks a checkout terminal for at most
    ``checkout.camera_fps`` (15) frames a second: a 30 fps camera that obeys sends every
    second frame, and the shopper still pays. A new video connection is capped again."""
    env = await make_env()
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    term = await env.terminal()
    await term.start_video(camera_frames(analyzer, photo(SHOPPER), fps=30), fps=30)
    assert (await term.expect("camera", timeout=5))["max_fps"] == 15
    assert (await term.checkout("12.50", "o-1"))["state"] == "scanning"
    confirm = await term.expect("confirm", "declined")
    assert confirm["type"] == "confirm", term.events
    sent, held = term.track.frames_sent, term.track.frames_held
    assert sent >= 5 and abs(sent - held) <= 1, (sent, held)  # 15 of 30 a second
    await term.send({"type": "cancel"})
    await term.until_end()
    assert [max_fps for _, max_fps in term.camera] == [15]
    # The same terminal offers a new video connection: the cap comes with its answer.
    await term.pc.close()
    await term.start_video(camera_frames(analyzer, photo(SHOPPER), fps=30), fps=30)
    assert (await term.expect("camera", timeout=5))["max_fps"] == 15


async def test_facepay_replay_obeys_the_cap(make_env, analyzer, photo):
    """``facepay replay`` of a 30 fps source sends 15 frames a second once the server asks,
    prints the request, and the shopper pays."""
    env = await make_env()
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    lines: list[dict] = []
    frames = camera_frames(analyzer, photo(SHOPPER), fps=30)
    async with asyncio.timeout(40):
        result = await replay.run_replay(
            str(env.server.make_url("/")), env.token, "checkout", frames, fps=30,
            amount="12.50", order_id="o-r", passphrase=PASSPHRASE, timeout_s=30,
            out=lines.append,
        )  # fmt: skip
    assert result["outcome"] == "approved", lines
    assert [line["max_fps"] for line in lines if line["type"] == "camera"] == [15]
    # Sent at 15 a second from the first frame (one frame of slack for the clock).
    assert 4 <= result["frames_sent"] <= result["t_ms"] / 1000 * 15 + 2, result


async def test_no_cap_is_asked_when_none_is_configured(make_env, analyzer, photo):
    """``checkout.camera_fps: null``: the camera keeps its rate, the server asks nothing."""
    env = await make_env(checkout={"camera_fps": None})
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    term = await env.terminal()
    await term.start_video(camera_frames(analyzer, photo(SHOPPER), fps=30), fps=30)
    assert (await term.checkout("12.50", "o-1"))["state"] == "scanning"
    assert (await term.expect("confirm", "declined"))["type"] == "confirm", term.events
    assert term.camera == [] and term.track.frames_held == 0


async def test_an_overloaded_server_asks_for_fewer_frames_then_more_again(make_env):
    """While the workers are busy elsewhere, the frames a checkout camera sends are decoded
    and dropped unanalysed: the server asks for fewer (``checkout.load_pacing``, down to
    ``min_fps``), and back up to ``camera_fps`` in steps once it analyses them all again."""
    env = await make_env()
    term = await env.terminal()
    await term.start_video(empty_frames(seconds=40))
    assert (await term.expect("camera", timeout=5))["max_fps"] == 15
    assert (await term.checkout("1.00", "o-load"))["state"] == "scanning"
    await asyncio.sleep(1.0)  # frames flow and are analysed: nothing asked
    assert [fps for _, fps in term.camera] == [15]
    # Real load: both workers busy for 3.5 s (what 16 terminals on 2 cores look like), more
    # than the two windows of a second in a row the pacer waits for.
    loop = asyncio.get_running_loop()
    busy = [loop.run_in_executor(env.app[EXECUTOR], time.sleep, 3.5) for _ in range(2)]
    assert (await term.expect("camera", timeout=5))["max_fps"] == 5.0
    # The next shopper steps up while the server is still short: the lowered rate holds.
    await term.send({"type": "cancel"})
    assert (await term.until_end())["state"] == "cancelled"
    assert (await term.checkout("1.00", "o-load-2"))["state"] == "scanning"
    await asyncio.gather(*busy)
    steps = [(await term.expect("camera", timeout=10))["max_fps"] for _ in range(3)]
    assert steps == [7.5, 11.2, 15.0], term.camera
    assert term.track.frames_held > 0  # the camera obeyed
    await term.send({"type": "cancel"})
    assert (await term.until_end())["state"] == "cancelled"


async def test_after_a_rush_the_next_checkout_starts_at_the_full_rate(make_env):
    """A lowered camera is asked for ``camera_fps`` again as soon as a checkout starts on a
    server that keeps up (``load_pacing.restart_full``), not a step per window: at 5 fps an
    idle server confirms in about 970 ms against 370 ms at 15."""
    env = await make_env()
    term = await env.terminal()
    await term.start_video(empty_frames(seconds=40))
    assert (await term.expect("camera", timeout=5))["max_fps"] == 15
    assert (await term.checkout("1.00", "o-rush"))["state"] == "scanning"
    await asyncio.sleep(1.0)
    loop = asyncio.get_running_loop()
    busy = [loop.run_in_executor(env.app[EXECUTOR], time.sleep, 3.5) for _ in range(2)]
    assert (await term.expect("camera", timeout=5))["max_fps"] == 5.0
    await term.send({"type": "cancel"})  # the shopper walks away during the rush
    assert (await term.until_end())["state"] == "cancelled"
    await asyncio.gather(*busy)
    await asyncio.sleep(3.0)  # calm: the rush's frames fade from the server's average
    asked = len(term.camera)
    assert (await term.checkout("1.00", "o-calm"))["state"] == "scanning"
    assert (await term.expect("camera", timeout=2))["max_fps"] == 15.0, term.camera
    assert len(term.camera) == asked + 1
    await term.send({"type": "cancel"})
    assert (await term.until_end())["state"] == "cancelled"


async def test_three_wrong_passphrases_lock_the_account(make_env, analyzer, photo):
    env = await make_env()
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    term = await _shopper_session(env, analyzer, photo)
    confirm = await term.expect("confirm")
    for left, guess in ((2, "wrong-guess-1"), (1, "wrong-guess-2")):
        await term.send(
            {"type": "passphrase", "prompt_id": confirm["prompt_id"], "passphrase": guess}
        )
        wrong = await term.expect("wrong_passphrase")
        assert wrong["attempts_left"] == left
    await term.send(
        {"type": "passphrase", "prompt_id": confirm["prompt_id"], "passphrase": "wrong-guess-3"}
    )
    declined = await term.expect("declined")
    assert declined["reason"] == "locked"
    assert await env.payments() == []
    # A fresh session for that account is refused while locked, with the reason.
    await term.checkout("1.00", "o-2")
    again = await term.expect("declined", "confirm")
    assert again == {**again, "type": "declined", "reason": "locked"}
    # Even the right passphrase cannot be tried: no prompt is ever sent.
    assert "confirm" not in term.types()[term.types().index("declined") :]


async def test_the_same_wrong_passphrase_sent_again_counts_once(make_env, analyzer, photo):
    """A double press of Pay (or a resend) delivers one typo several times: it costs one
    attempt, not three, and the right passphrase still pays."""
    env = await make_env()
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    term = await _shopper_session(env, analyzer, photo)
    confirm = await term.expect("confirm")
    answer = {"type": "passphrase", "prompt_id": confirm["prompt_id"]}
    for _ in range(3):  # sent back to back, before the first answer comes
        await term.send({**answer, "passphrase": "correct horse battery stapel"})
    for _ in range(3):
        wrong = await term.expect("wrong_passphrase")
        assert wrong["attempts_left"] == 2, term.events
    assert await env.app[REDIS].get("fp:fail:acct-obama") == b"1"
    # A different wrong answer is counted: a guesser gets no extra tries from repeats.
    await term.send({**answer, "passphrase": "another-guess"})
    assert (await term.expect("wrong_passphrase"))["attempts_left"] == 1
    await term.send({**answer, "passphrase": PASSPHRASE})
    assert (await term.expect("approved", "declined"))["type"] == "approved", term.events
    assert len(await env.payments()) == 1
    assert await env.app[REDIS].get("fp:fail:acct-obama") is None


async def test_a_repeated_wrong_passphrase_still_meets_a_lock_set_meanwhile(
    make_env, analyzer, photo
):
    """A repeat is answered without a check, but not past a lock another prompt set."""
    env = await make_env()
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    term = await _shopper_session(env, analyzer, photo)
    confirm = await term.expect("confirm")
    answer = {"type": "passphrase", "prompt_id": confirm["prompt_id"], "passphrase": "guess-1"}
    await term.send(answer)
    assert (await term.expect("wrong_passphrase"))["attempts_left"] == 2
    until = None
    while until is None:  # wrong answers at another prompt, through the shared store
        _, until = await env.store.record_failure("acct-obama", 3, 60.0)
    await term.send(answer)
    declined = await term.expect("declined", "wrong_passphrase")
    assert declined["type"] == "declined" and declined["reason"] == "locked", term.events
    assert declined["locked_until"] == pytest.approx(until, abs=0.05)
    assert await env.payments() == []


async def test_unknown_face_is_declined_no_match(make_env, analyzer, photo):
    env = await make_env()
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    term = await _shopper_session(env, analyzer, photo, rel="spoof/image_T1.jpg")
    declined = await term.expect("declined", "confirm")
    assert declined["type"] == "declined" and declined["reason"] == "no_match"
    assert "confirm" not in term.types()


@pytest.mark.parametrize("attack", ["spoof/image_F1.jpg", "spoof/image_F2.jpg"])
async def test_print_and_screen_attacks_are_declined_spoof(make_env, analyzer, photo, attack):
    env = await make_env()
    # Enrol the attacked person's own photo: even a perfect match must not pay.
    await env.enroll("acct-victim", "Victim Person", "+86 138 0000 1234", photo(attack))
    term = await _shopper_session(env, analyzer, photo, rel=attack)
    declined = await term.expect("declined", "confirm")
    assert declined["type"] == "declined" and declined["reason"] == "spoof", term.events
    assert "confirm" not in term.types()


async def test_no_face_times_out_without_charge(make_env):
    env = await make_env(session_timeout_s=3.0)
    term = await env.terminal()
    await term.start_video(empty_frames())
    await term.checkout("5.00", "o-1")
    end = await term.until_end(timeout=15)
    assert end["state"] == "timeout" and end["reason"] == "session_timeout"
    assert await env.payments() == []


async def test_prompt_expires(make_env, analyzer, photo):
    env = await make_env(prompt_expiry_s=3.0)
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    term = await _shopper_session(env, analyzer, photo)
    confirm = await term.expect("confirm")
    assert confirm["expires_in_s"] == 3.0
    end = await term.until_end(timeout=10)
    assert end["state"] == "timeout" and end["reason"] == "prompt_expired"
    # A late passphrase is refused and pays nothing.
    await term.send(
        {"type": "passphrase", "prompt_id": confirm["prompt_id"], "passphrase": PASSPHRASE}
    )
    err = await term.expect("error")
    assert err["code"] == "illegal_transition"
    assert await env.payments() == []


async def test_cancel_while_scanning(make_env):
    env = await make_env()
    term = await env.terminal()
    await term.start_video(empty_frames())
    await term.checkout("5.00", "o-1")
    await term.send({"type": "cancel"})
    end = await term.until_end(timeout=10)
    assert end["state"] == "cancelled"


async def test_dropped_connection_during_confirm_charges_nothing(make_env, analyzer, photo):
    env = await make_env()
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    term = await _shopper_session(env, analyzer, photo)
    await term.expect("confirm")
    await term.close()
    await asyncio.sleep(0.5)
    assert await env.payments() == []
    # The server is fine: a new terminal pays normally.
    term2 = await _shopper_session(env, analyzer, photo, order="o-2")
    confirm = await term2.expect("confirm")
    await term2.send(
        {"type": "passphrase", "prompt_id": confirm["prompt_id"], "passphrase": PASSPHRASE}
    )
    assert (await term2.expect("approved"))["order_id"] == "o-2"
