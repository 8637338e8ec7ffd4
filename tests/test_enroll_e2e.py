"""Live enrolment end to end: real WebRTC on 127.0.0.1, real Redis, models and photos."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.errors import StoreUnavailable
from session.config import FacePayConfig
from session.enroll import EnrollRequest, EnrollSession
from session.frames import FrameSlot
from session.hints import ENROL_HINTS, enrol_hint
from stream_server.app import CONNECTIONS, LIMITER, REDIS, STORE
from tests.e2e import camera_frames

ENROLL = "faces/obama/obama.jpg"
SHOPPER = "faces/obama/obama3.jpg"  # another photo of the same person
SECRET = "my new pass 77"
FIELDS = {"account_id": "acct-live", "name": "Barack Obama", "phone": "+1 202 555 0101"}
HINTS = {"closer", "farther", "more_light", "less_light", "look_at_camera", "hold_still"}
HINTS |= {"move_to_centre", "upside_down"}
HINTS |= {"one_person", "no_face", "ok"}


pytestmark = pytest.mark.usefixtures("loopback_ice")


def test_quality_reasons_map_to_the_documented_hints():
    assert enrol_hint(("too_close",)) == "farther"
    assert enrol_hint(("too_small",)) == "closer"
    assert enrol_hint(("cut_off", "too_small")) == "move_to_centre"
    assert enrol_hint(("upside_down",)) == "upside_down"
    assert enrol_hint(("too_dark", "blurry")) == "more_light"  # the first match wins
    assert enrol_hint(()) == "ok"
    assert {hint for _, hint in ENROL_HINTS} | {"one_person", "no_face", "ok"} == HINTS


async def _enroll_terminal(env, analyzer, photo, rel=ENROLL, fps=15):
    _, token = await env.store.add_terminal(env.merchant.merchant_id, "enroll")
    term = await env.terminal(token)
    await term.start_video(camera_frames(analyzer, photo(rel), fps=fps), fps=fps)
    return term


async def _accounts(env) -> list[bytes]:
    return [k async for k in env.app[REDIS].scan_iter("fp:account:*")]


async def _capture(term, **fields):
    await term.send({"type": "start_enroll", "consent": True, **FIELDS, **fields})
    assert (await term.expect("state"))["state"] == "capturing", term.events
    state = await term.expect("state", timeout=40)
    assert state["state"] == "passphrase", term.events


async def test_consent_is_required_and_nothing_is_stored(make_env, analyzer, photo):
    env = await make_env()
    term = await _enroll_terminal(env, analyzer, photo)
    await term.send({"type": "start_enroll", "consent": False, **FIELDS})
    assert (await term.expect("error"))["code"] == "invalid_request"
    await term.send({"type": "start_enroll", **FIELDS})
    assert (await term.expect("error"))["code"] == "invalid_request"
    await term.send({"type": "start_enroll", "consent": "true", **FIELDS})
    assert (await term.expect("error"))["code"] == "invalid_request"
    await term.send({"type": "start_enroll", "consent": True, **FIELDS, "account_id": "bad id!"})
    assert (await term.expect("error"))["code"] == "invalid_request"
    await term.send({"type": "ping"})
    await term.expect("pong")
    assert "state" not in term.types()
    # Video flows, but an enroll terminal keeps no frame before consent.
    await asyncio.sleep(1.0)
    (conn,) = env.app[CONNECTIONS]
    assert conn.frames.received == 0 and conn.frames._item is None
    assert await _accounts(env) == []
    audit = await env.store.read_audit()
    assert not [e for e in audit if e.get("event") == "consent"]


async def test_checkout_terminal_cannot_enroll(make_env):
    env = await make_env()
    term = await env.terminal()
    await term.send({"type": "start_enroll", "consent": True, **FIELDS})
    assert (await term.expect("error"))["code"] == "invalid_request"


async def test_live_enrolment_then_the_new_account_pays(make_env, analyzer, photo):
    env = await make_env()
    term = await _enroll_terminal(env, analyzer, photo)
    await _capture(term)
    feedback = [e for e in term.events if e["type"] == "enroll_feedback"]
    assert feedback, term.events
    assert all(e["hint"] in HINTS and 0 <= e["progress"] <= 1 for e in feedback)
    assert max(e["progress"] for e in feedback) > 0
    assert any(e["type"] == "faces" for e in term.events)
    (conn,) = env.app[CONNECTIONS]
    assert conn.frames.received > 0  # after consent the frames are taken
    # A mismatch (or a too-short passphrase) is an error and the terminal may try again.
    await term.send({"type": "enroll_passphrase", "passphrase": SECRET, "confirm": "other one"})
    error = await term.expect("error")
    assert error["code"] == "invalid_request" and SECRET not in error["message"]
    await term.send({"type": "enroll_passphrase", "passphrase": "abc", "confirm": "abc"})
    assert (await term.expect("error"))["code"] == "invalid_request"
    await term.send({"type": "enroll_passphrase", "passphrase": SECRET, "confirm": SECRET})
    enrolled = await term.expect("enrolled", "declined")
    assert enrolled == {"type": "enrolled", "account_id": "acct-live", "templates": 3}
    assert (await term.expect("state"))["state"] == "enrolled"
    assert all(SECRET not in str(e) for e in term.events)
    # The connection stays open for the next enrolment; the finished one keeps nothing of
    # the face it saw (its stream starts afresh).
    await asyncio.wait_for(conn.session_task, 5)
    assert conn.session.stream.frames == 0 and conn.session.stream.evidence == {}
    audit = await env.store.read_audit()
    consent = [e for e in audit if e.get("event") == "consent"]
    assert consent and all(e.get("terminal") for e in consent)
    # The new account pays at a checkout terminal with another photo of the same person.
    shop = await env.terminal()
    await shop.start_video(camera_frames(analyzer, photo(SHOPPER)))
    assert (await shop.checkout("8.00", "o-live"))["state"] == "scanning"
    confirm = await shop.expect("confirm", "declined")
    assert confirm["type"] == "confirm", shop.events
    await shop.send({"type": "passphrase", "prompt_id": confirm["prompt_id"], "passphrase": SECRET})
    approved = await shop.expect("approved", "declined")
    assert approved["type"] == "approved", shop.events
    payment = await env.store.get_payment(approved["payment_id"])
    assert payment.account_id == "acct-live"


async def test_an_enrolment_camera_is_capped_and_still_enrols(make_env, analyzer, photo):
    """Right after the answer the server asks an enroll terminal for at most
    ``enrollment.camera_fps`` (15) frames a second: a 30 fps camera that obeys sends every
    second frame, and the capture still collects its templates from a live face."""
    env = await make_env()
    term = await _enroll_terminal(env, analyzer, photo, fps=30)
    assert (await term.expect("camera", timeout=5))["max_fps"] == 15
    await _capture(term)
    sent, held = term.track.frames_sent, term.track.frames_held
    assert sent >= 5 and abs(sent - held) <= 1, (sent, held)  # 15 of 30 a second
    await term.send({"type": "enroll_passphrase", "passphrase": SECRET, "confirm": SECRET})
    enrolled = await term.expect("enrolled", "declined")
    assert enrolled == {"type": "enrolled", "account_id": "acct-live", "templates": 3}
    assert [max_fps for _, max_fps in term.camera] == [15]


async def test_no_enrolment_cap_is_asked_when_none_is_configured(make_env, analyzer, photo):
    """``enrollment.camera_fps: null``: the camera keeps its rate, the server asks nothing."""
    env = await make_env(enrollment={"camera_fps": None})
    term = await _enroll_terminal(env, analyzer, photo, fps=30)
    await _capture(term)
    assert term.camera == [] and term.track.frames_held == 0


async def test_print_attack_is_declined_spoof(make_env, analyzer, photo):
    env = await make_env()
    term = await _enroll_terminal(env, analyzer, photo, rel="spoof/image_F1.jpg")
    await term.send({"type": "start_enroll", "consent": True, **FIELDS})
    assert (await term.expect("state"))["state"] == "capturing"
    declined = await term.expect("declined", "state", timeout=40)
    while declined["type"] == "state" and declined["state"] == "capturing":
        declined = await term.expect("declined", "state", timeout=40)
    assert declined == {"type": "declined", "reason": "spoof"}, term.events
    assert await _accounts(env) == []


async def test_taken_account_id_is_declined_conflict_before_any_capture(make_env, analyzer, photo):
    """A taken account id would fail at the write: it is declined before the camera is used
    or a consent recorded, so no face is captured for an enrolment that cannot succeed."""
    env = await make_env()
    await env.enroll("acct-live", "Someone Else", "+1 202 555 0199", photo(SHOPPER))
    term = await _enroll_terminal(env, analyzer, photo)
    await term.send({"type": "start_enroll", "consent": True, **FIELDS})
    declined = await term.expect("declined", "state")
    assert declined == {"type": "declined", "reason": "conflict"}, term.events
    assert (await term.expect("state"))["state"] == "declined"
    assert "capturing" not in [e.get("state") for e in term.events]
    consents = [e for e in await env.store.read_audit() if e["event"] == "consent"]
    assert [c.get("method") for c in consents] == ["test"]  # only the first enrolment's
    assert len(await _accounts(env)) == 1


async def test_an_id_taken_during_capture_is_still_declined_conflict(make_env, analyzer, photo):
    """Free when the enrolment starts, taken by someone else while the face is captured:
    the write itself refuses it (one transaction), nothing of the second is stored."""
    env = await make_env()
    term = await _enroll_terminal(env, analyzer, photo)
    await _capture(term)
    await env.enroll("acct-live", "Someone Else", "+1 202 555 0199", photo(SHOPPER))
    await term.send({"type": "enroll_passphrase", "passphrase": SECRET, "confirm": SECRET})
    declined = await term.expect("declined", "enrolled")
    assert declined == {"type": "declined", "reason": "conflict"}, term.events
    assert len(await _accounts(env)) == 1


async def test_a_terminal_revoked_during_capture_enrols_no_one(make_env, analyzer, photo):
    """Revoked in Redis with no event to any server (the revocation's pub/sub message lost
    to a cut subscription, or its close racing the hello): the socket stays open, and only
    the account's write can refuse the terminal."""
    env = await make_env()
    desk, token = await env.store.add_terminal(env.merchant.merchant_id, "enroll")
    term = await env.terminal(token)
    await term.start_video(camera_frames(analyzer, photo(ENROLL)), fps=15)
    await _capture(term)
    await env.app[REDIS].hset(f"fp:terminal:{desk.terminal_id}", "status", "revoked")
    await term.send({"type": "enroll_passphrase", "passphrase": SECRET, "confirm": SECRET})
    declined = await term.expect("declined", "enrolled", timeout=30)
    assert declined == {"type": "declined", "reason": "terminal_revoked"}, term.events
    assert await _accounts(env) == []
    assert [e for e in await env.store.read_audit() if e["event"] == "enrolled"] == []


async def test_a_key_rotation_begun_during_capture_stores_nothing(make_env, analyzer, photo):
    """A rotation marks itself open in Redis before it rewrites anything: this server's
    enrolment is then refused at the write (declined unavailable, not internal_error)."""
    env = await make_env()
    term = await _enroll_terminal(env, analyzer, photo)
    await _capture(term)
    await env.app[REDIS].set("fp:template_key_check:next", "0" * 32)
    await term.send({"type": "enroll_passphrase", "passphrase": SECRET, "confirm": SECRET})
    declined = await term.expect("declined", "enrolled", timeout=30)
    assert declined == {"type": "declined", "reason": "unavailable"}, term.events
    assert await _accounts(env) == []


async def test_an_enrolled_face_is_declined_already_enrolled(make_env, analyzer, photo):
    """The same person again, under a new account id and a phone with the same last four
    digits: no checkout could tell the two accounts apart, so nothing is written."""
    env = await make_env()
    await env.enroll("acct-first", "Barack Obama", "+1 202 555 0101", photo(SHOPPER))
    term = await _enroll_terminal(env, analyzer, photo)
    await _capture(term)
    await term.send({"type": "enroll_passphrase", "passphrase": SECRET, "confirm": SECRET})
    declined = await term.expect("declined", "enrolled")
    assert declined == {"type": "declined", "reason": "already_enrolled"}, term.events
    assert len(await _accounts(env)) == 1


async def test_a_cancel_during_the_duplicate_check_stores_nothing(
    make_env, analyzer, photo, monkeypatch
):
    """The duplicate check waits on Redis (the look-alike's budget) after the last look at
    the inbox: a cancel, or a disconnect whose task cancel redis-py swallowed, that came in
    meanwhile used to be ignored, and the account was written anyway."""
    env = await make_env()
    await env.enroll("acct-twin", "Look Alike", "+1 202 555 0199", photo(SHOPPER))
    term = await _enroll_terminal(env, analyzer, photo)
    await _capture(term)
    limiter = env.app[LIMITER]
    hit = limiter.hit

    async def cancelled_meanwhile(*args, **kwargs):
        await term.send({"type": "cancel"})
        await asyncio.sleep(0.3)  # the server has queued it
        return await hit(*args, **kwargs)

    monkeypatch.setattr(limiter, "hit", cancelled_meanwhile)
    await term.send({"type": "enroll_passphrase", "passphrase": SECRET, "confirm": SECRET})
    state = await term.expect("state", timeout=30)
    assert state["state"] == "cancelled", term.events
    assert "enrolled" not in term.types()
    assert len(await _accounts(env)) == 1  # the twin's only


@pytest.mark.parametrize("written", [True, False])
async def test_a_write_whose_outcome_is_unknown_is_not_called_nothing_stored(
    make_env, analyzer, photo, monkeypatch, written
):
    """Redis fails around the account's write. Only when the write certainly never left may
    the person be told that nothing was stored (`unavailable`); a write whose reply was lost
    may have committed (`enrolment_unknown`, and the account is there)."""
    env = await make_env()
    term = await _enroll_terminal(env, analyzer, photo)
    await _capture(term)
    store = env.app[STORE]
    create = store.create_account

    async def reply_lost(*args, **kwargs):
        if written:
            await create(*args, **kwargs)
        err = StoreUnavailable("redis unavailable during create_account (ConnectionError)")
        err.unsent = not written
        raise err

    monkeypatch.setattr(store, "create_account", reply_lost)
    await term.send({"type": "enroll_passphrase", "passphrase": SECRET, "confirm": SECRET})
    declined = await term.expect("declined", "enrolled", timeout=30)
    reason = "enrolment_unknown" if written else "unavailable"
    assert declined == {"type": "declined", "reason": reason}, term.events
    assert len(await _accounts(env)) == int(written)


def test_a_capture_keeps_templates_of_one_person(analyzer):
    """The tracker keeps a face on its track down to cosine 0.3, so a look-alike stepping
    into the enrolling person's box mid-capture stays on the same track: their templates
    were kept with the first person's, and they could then pay from this account. Another
    person's template starts the capture over from them."""
    config = FacePayConfig()
    services = SimpleNamespace(config=config, analyzer=analyzer)
    request = EnrollRequest("m_1", "t_1", "acct-live", "Barack Obama", "+1 202 555 0101")
    session = EnrollSession(services, request, FrameSlot(), lambda _msg: None)  # type: ignore[arg-type]
    rng = np.random.default_rng(1)

    def unit(v):
        return (v / np.linalg.norm(v)).astype(np.float32)

    first = unit(rng.normal(size=128))
    same = unit(first + 0.3 * unit(rng.normal(size=128)))  # the same person, another frame
    other = unit(0.35 * first + 0.94 * unit(rng.normal(size=128)))  # cosine ~0.35
    assert float(first @ same) > 0.9 and 0.3 < float(first @ other) < 0.45

    def report(embedding):
        quality = SimpleNamespace(ok=True)
        analysis = SimpleNamespace(quality=quality, embedding=embedding, p_real=0.95)
        return SimpleNamespace(track_id=7, analysis=analysis)

    gap = config.enrollment.min_gap_s
    for i, embedding in enumerate([first, same, other]):
        session._collect(report(embedding), i * gap)  # type: ignore[arg-type]
    assert len(session._templates) == 1 and session._templates[0] is other


async def test_cancel_while_capturing(make_env, analyzer, photo):
    env = await make_env()
    term = await _enroll_terminal(env, analyzer, photo)
    await term.send({"type": "start_enroll", "consent": True, **FIELDS})
    assert (await term.expect("state"))["state"] == "capturing"
    await term.send({"type": "cancel"})
    state = await term.expect("state")
    assert state["state"] in ("cancelled", "passphrase")
    if state["state"] == "passphrase":  # capture finished first; cancel still ends it
        state = await term.expect("state")
    assert state["state"] == "cancelled"
    assert await _accounts(env) == []


async def test_merchant_offer_after_approval(make_env, analyzer, photo):
    env = await make_env(offer_text="Join our club: 5% off", offer_kind="coupon")
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    term = await env.terminal()
    await term.start_video(camera_frames(analyzer, photo(SHOPPER)))
    await term.checkout("2.00", "o-offer")
    confirm = await term.expect("confirm")
    from tests.e2e import PASSPHRASE

    await term.send(
        {"type": "passphrase", "prompt_id": confirm["prompt_id"], "passphrase": PASSPHRASE}
    )
    await term.expect("approved")
    offer = await term.expect("merchant_offer")
    assert offer == {"type": "merchant_offer", "text": "Join our club: 5% off", "kind": "coupon"}
