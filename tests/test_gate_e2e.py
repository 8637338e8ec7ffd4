"""Walk-through gate end to end: generated scenes over real WebRTC, real Redis and models.

Asserts decisions, not speed (decision_ms is measured by ``facepay bench-gate``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading

import pytest

from pipeline.errors import InvalidRequest
from pipeline.scene import Actor, SceneSpec, render_scene
from pipeline.scene_presets import largest_face_box, preset_scene, preset_turn_away
from session.store import Store
from stream_server.app import CONNECTIONS, DIRECTORY, METRICS
from tests.faultkit import fail_payment_writes

pytestmark = pytest.mark.usefixtures("loopback_ice")


@pytest.fixture
async def env(make_env):
    return await make_env()


async def _run_gate(env, analyzer, photo, spec: SceneSpec):
    """Enrol the scene's enrolled people, stream it through a gate terminal; its gate
    events, the accounts opened for, the gate session and every event the terminal got."""
    enrolled = {}
    for actor in spec.actors:
        if actor.enrolled and actor.enroll_photo and actor.name not in enrolled:
            await env.enroll(
                actor.name, actor.name.title(), "+8613800001234", photo(actor.enroll_photo)
            )
            enrolled[actor.name] = actor.kind
    _, token = await env.store.add_terminal(env.merchant.merchant_id, "gate")
    frames = [f for f, _ in render_scene(spec, photo, largest_face_box(analyzer.detect))]
    term = await env.terminal(token=token)
    await term.start_video(frames, fps=spec.fps)
    session = next(c.session for c in env.app[CONNECTIONS] if c.terminal.mode == "gate")
    await asyncio.wait_for(term.track.source_done.wait(), spec.seconds + 20)
    await asyncio.sleep(1.0)  # decisions on the last frames
    events = [e for e in term.events if e["type"] in ("gate_open", "gate_deny")]
    opened = []
    for e in events:
        if e["type"] == "gate_open":
            opened.append((await env.store.get_payment(e["payment_id"])).account_id)
    return events, opened, session, term


def _expect(spec: SceneSpec):
    live_enrolled = sorted({a.name for a in spec.actors if a.enrolled and a.kind == "live"})
    unknown = sum(1 for a in spec.actors if not a.enrolled and a.kind == "live")
    prints = sum(1 for a in spec.actors if a.kind == "print")
    return live_enrolled, unknown, prints


@pytest.mark.parametrize("people", [1, 3, 5])
async def test_each_person_gets_one_right_decision(env, analyzer, photo, people, monkeypatch):
    spec = preset_scene(people)
    directory = env.app[DIRECTORY]
    identify, threads = directory.identify, []

    def recorded(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return identify(*args, **kwargs)

    monkeypatch.setattr(directory, "identify", recorded)
    events, opened, session, _ = await _run_gate(env, analyzer, photo, spec)
    # Each search ran in the search thread, off the event loop and the inference pool.
    assert threads and all(name.startswith("facepay-search") for name in threads), threads
    live_enrolled, unknown, prints = _expect(spec)
    assert sorted(opened) == live_enrolled, events  # each enrolled walker exactly once
    denies = [e["reason"] for e in events if e["type"] == "gate_deny"]
    assert denies.count("unknown") == unknown, events
    assert denies.count("spoof") == prints, events
    assert len(denies) == unknown + prints, events  # nothing else, nobody denied wrongly
    assert len(await env.payments()) == len(live_enrolled)  # one fare each
    for e in events:
        assert e["decision_ms"] > 0 and isinstance(e["track_id"], int)
    # Every decided track was decided once: one event per track id.
    assert len({e["track_id"] for e in events}) == len(events)
    # The server-side record matches.
    assert session.outcomes["open"] == len(live_enrolled), session.outcomes
    assert session.outcomes["deny"] == len(denies), session.outcomes
    # ... and keeps no decision of a walker who has gone (a gate's session runs for days).
    assert set(session.decisions) <= set(session.stream.evidence), session.decisions


async def test_a_person_passing_twice_in_the_window_pays_once(env, analyzer, photo):
    first = preset_scene(1).actors[0]
    # Out, then back in 1.2 s later: longer than the tracker keeps a lost track, so the
    # second pass is a new track of the same account inside the 60 s entry window.
    second = dataclasses.replace(
        first,
        name="obama_again",
        enrolled=False,
        enroll_photo=None,
        enter_s=first.exit_s + 1.2,
        exit_s=first.exit_s + 4.0,
    )
    spec = SceneSpec(seconds=second.exit_s + 0.2, actors=(first, second), seed=1)
    events, opened, session, _ = await _run_gate(env, analyzer, photo, spec)
    assert opened == ["obama"], events
    assert len(await env.payments()) == 1
    assert session.outcomes["repeat"] == 1, session.outcomes


@pytest.mark.parametrize("fault", ["reply_lost", "not_written", "lookup_fails"])
async def test_a_fare_whose_write_fails_is_never_charged_twice(
    env, analyzer, photo, monkeypatch, fault
):
    """Redis fails while a fare is written (the store raises ``StoreUnavailable``):

    - ``reply_lost``: the payment was written, only its reply was lost. The gate finds it by
      the id it chose first and opens: charged once, and the person passes;
    - ``not_written``: nothing was written. It denies ``unavailable`` and releases the entry
      claim, so the person may try again;
    - ``lookup_fails``: Redis cannot say either way. It denies ``unavailable`` and keeps the
      claim until the entry window ends: a retry is a repeat, never a second fare.
    """
    store = env.store
    written, lookup_fails = fault == "reply_lost", fault == "lookup_fails"
    fail_payment_writes(monkeypatch, store, written=written, lookup_fails=lookup_fails)
    events, opened, _, _ = await _run_gate(env, analyzer, photo, preset_scene(1))
    monkeypatch.undo()
    decided = [(e["type"], e.get("reason")) for e in events]
    claimed_again = await store.claim_gate_entry(env.merchant.merchant_id, "obama", 60)
    if fault == "reply_lost":
        assert decided == [("gate_open", None)] and opened == ["obama"], events
        assert len(await env.payments()) == 1
        assert not claimed_again
    else:
        assert decided == [("gate_deny", "unavailable")], events
        assert await env.payments() == []
        assert (claimed_again is not None) is (fault == "not_written")


async def test_a_decision_that_fails_unexpectedly_denies_and_the_gate_goes_on(
    env, analyzer, photo, monkeypatch
):
    """The first walker's subject link fails to open (as during a key rotation): that walker
    is denied, nothing is charged for them, and the gate keeps deciding for the rest (it
    used to end its loop, silently, with the socket still up)."""
    store = env.store
    lookup = store.account_for_subject
    failed = []

    async def first_fails(subject_id):
        if not failed:
            failed.append(subject_id)
            raise InvalidRequest("link does not open")
        return await lookup(subject_id)

    monkeypatch.setattr(store, "account_for_subject", first_fails)
    spec = preset_scene(3)
    events, opened, _, _ = await _run_gate(env, analyzer, photo, spec)
    monkeypatch.undo()
    live_enrolled, unknown, prints = _expect(spec)
    assert failed, "no walker was ever matched"
    denies = [e["reason"] for e in events if e["type"] == "gate_deny"]
    assert denies.count("unavailable") == 1, events
    assert len(opened) == len(live_enrolled) - 1, events  # the others still pass
    assert len(await env.payments()) == len(opened)
    assert denies.count("unknown") == unknown and denies.count("spoof") == prints, events


async def test_a_gate_that_went_away_during_its_entry_claim_charges_nobody(
    env, analyzer, photo, monkeypatch
):
    """The gate's socket closes while the entry is being claimed, and its task's cancel is
    swallowed (redis-py on Python 3.11 can): the session's stop flag must still keep the
    fare from being written, and the claim is given back for the person's next gate."""
    store = env.store
    claim = store.claim_gate_entry
    stopped = []

    async def claim_then_gone(*args, **kwargs):
        granted = await claim(*args, **kwargs)
        for conn in env.app[CONNECTIONS]:
            if conn.session is not None and conn.terminal.mode == "gate":
                conn.session.stop()  # the stop flag alone: the task itself runs on
                stopped.append(conn.session)
        return granted

    monkeypatch.setattr(store, "claim_gate_entry", claim_then_gone)
    events, opened, _, _ = await _run_gate(env, analyzer, photo, preset_scene(1))
    monkeypatch.undo()
    assert stopped, "the gate never claimed an entry"
    assert opened == [] and not [e for e in events if e["type"] == "gate_open"], events
    assert await env.payments() == []
    assert await store.claim_gate_entry(env.merchant.merchant_id, "obama", 60) is not None


async def test_turning_away_before_enough_evidence_gets_no_decision(env, analyzer, photo):
    events, opened, _, _ = await _run_gate(env, analyzer, photo, preset_turn_away())
    assert events == [] and opened == []
    assert await env.payments() == []


@pytest.fixture
async def claims(redis_url):
    """A store on the test's Redis, for the gate entry claims alone."""
    import redis.asyncio as aioredis

    from session.crypto import TemplateCipher, generate_key

    client = aioredis.from_url(redis_url)
    yield Store(client, TemplateCipher(generate_key()))
    await client.aclose()


async def test_concurrent_gates_claim_an_entry_once(claims):
    store = claims
    wins = await asyncio.gather(*[store.claim_gate_entry("m1", "acct", 60) for _ in range(20)])
    won = [w for w in wins if w is not None]
    assert len(won) == 1
    await store.release_gate_entry("m1", "acct", won[0])
    assert await store.claim_gate_entry("m1", "acct", 60)
    assert not await store.claim_gate_entry("m1", "acct", 60)
    assert await store.claim_gate_entry("m2", "acct", 60)  # another operator's gates


async def test_a_late_release_does_not_free_the_next_gates_claim(claims):
    """Gate A's fare write outlasts its claim; gate B claims and charges the same person;
    A's release then (its write failed) must leave B's claim alone, or a re-formed track
    would be charged a second time inside one window."""
    store = claims
    store.gate_claim_hold_s = 0.2  # as if the write had outlasted the hold
    first = await store.claim_gate_entry("m1", "acct", 0.2)
    assert first is not None
    await asyncio.sleep(0.3)
    second = await store.claim_gate_entry("m1", "acct", 60)
    assert second is not None and second != first
    await store.release_gate_entry("m1", "acct", first)  # A, late
    assert await store.claim_gate_entry("m1", "acct", 60) is None, "B's claim was freed"
    await store.release_gate_entry("m1", "acct", second)  # B's own release still works
    assert await store.claim_gate_entry("m1", "acct", 60) is not None


async def test_a_claim_outlives_a_short_window_until_its_fare_is_written(claims):
    """A window shorter than a fare's write could take (a bench's few seconds): the claim
    is held for ``gate_claim_hold_s`` while the fare may be in flight, then cut back to the
    window once it is written."""
    store = claims
    store.gate_claim_hold_s = 1.5
    claim = await store.claim_gate_entry("m1", "acct", 0.2)
    assert claim is not None
    await asyncio.sleep(0.4)  # past the window, the write still in flight
    assert await store.claim_gate_entry("m1", "acct", 0.2) is None, "claim lapsed mid-write"
    await store.settle_gate_entry("m1", "acct", claim, 0.2, 0.4)  # written: window is over
    assert await store.claim_gate_entry("m1", "acct", 60) is not None
    # Written early in the window: the claim lasts the rest of it, then ends.
    other = await store.claim_gate_entry("m2", "acct", 0.5)
    assert other is not None
    await store.settle_gate_entry("m2", "acct", other, 0.5, 0.0)
    assert await store.claim_gate_entry("m2", "acct", 0.5) is None
    await asyncio.sleep(0.6)
    assert await store.claim_gate_entry("m2", "acct", 0.5) is not None


def test_actor_type_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Actor("x", "p").name = "y"  # type: ignore[misc]


async def test_an_empty_corridor_is_looked_at_the_idle_rate_and_a_walker_at_every_frame(
    make_env, analyzer, photo
):
    """``gate.idle_scan_fps`` (10): with nobody in view the gate analyses about ten frames a
    second of its 30, and runs the detector on those only when the view has changed or once
    a second (``gate.idle_change``); from the first face on it analyses every frame it can,
    and the walker is still decided. (The camera keeps its 30 fps here: the request for
    fewer frames is tested below.)"""
    env = await make_env(gate={"idle_camera": {"enabled": False}})
    walker = dataclasses.replace(preset_scene(1).actors[0], enter_s=2.0, exit_s=4.5)
    spec = SceneSpec(seconds=5.0, actors=(walker,), seed=2)
    events, opened, session, _ = await _run_gate(env, analyzer, photo, spec)
    assert opened == ["obama"], events
    trace = list(session.trace)  # (arrival, age ms, analysis ms, faces, detector ran)
    first_face = next(i for i, row in enumerate(trace) if row[3] > 0)
    empty = trace[:first_face]
    assert len(empty) >= 5  # the corridor was looked at (for 2 s before the walker enters)
    # Between two looks at the empty corridor: at least one idle interval (0.1 s) ...
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(empty)]
    assert min(gaps) >= 0.1, gaps
    # ... so at most ten looks a second, where 30 frames arrived.
    span = empty[-1][0] - empty[0][0]
    assert len(empty) <= span * 10 + 1, (len(empty), span)
    # And of those looks, the detector ran only on a changed view or once a second
    # (``gate.idle_change``): at the first look, at 1 s, and on the looks with part of the
    # walker in view before it found his face.
    looks = [row[0] - empty[0][0] for row in empty]
    detector_looks = [t for t, row in zip(looks, empty, strict=True) if row[4]]
    assert 2 <= len(detector_looks) <= 4, detector_looks
    assert detector_looks[:2] == [0.0, min(t for t in looks if t >= 1.0)], (looks, empty)
    assert all(row[4] for row in trace[first_face:] if row[3] > 0)
    # /metrics counts every skipped detector run of the session, the walker's wake included.
    skipped = sum(1 for row in trace if not row[4])
    assert skipped >= len(empty) - len(detector_looks)
    exposed = env.app[METRICS].render().decode()
    assert f"facepay_frames_no_detector_total {float(skipped)}" in exposed.splitlines()
    # While the walker is in view, no idle waits: the looks follow the frames.
    with_face = [row for row in trace[first_face:] if row[3] > 0]
    assert len(with_face) > 10
    face_gaps = sorted(b[0] - a[0] for a, b in itertools.pairwise(with_face))
    assert face_gaps[len(face_gaps) // 2] < 0.1, face_gaps


async def test_an_idle_gate_asks_its_camera_for_fewer_frames_and_a_walker_restores_them(
    make_env, analyzer, photo
):
    """``gate.idle_camera``: after ``after_s`` of empty, still corridor the gate terminal is
    asked for ``fps`` frames a second; the walker's first movement asks for the full rate
    again, before his decision; once he has gone and the corridor is still, fewer again."""
    env = await make_env(gate={"idle_camera": {"after_s": 1.0, "fps": 10}})
    walker = dataclasses.replace(preset_scene(1).actors[0], enter_s=2.5, exit_s=5.0)
    spec = SceneSpec(seconds=7.5, actors=(walker,), seed=3)
    events, opened, session, term = await _run_gate(env, analyzer, photo, spec)
    assert opened == ["obama"], events
    term_events = [e for e in term.events if e["type"] in ("camera", "gate_open")]
    kinds = [(e["type"], e.get("max_fps")) for e in term_events]
    assert kinds == [("camera", 10), ("camera", None), ("gate_open", None), ("camera", 10)], kinds
    assert session.camera_fps == 10
    # The test camera obeyed (as the gate page does): it left out two frames of three ...
    assert term.track.frames_held > 0
    # ... and the gate looked at (nearly) every frame it still sent, jitter or not: at 10
    # frames a second an early frame is not left for the next idle interval.
    (low, _), (full, _) = term.camera[:2]
    window = [row for row in session.trace if low + 0.2 <= row[0] < full]
    frames = (full - low - 0.2) * 10
    assert len(window) >= 0.8 * frames, (len(window), frames)


async def test_the_idle_camera_request_can_be_turned_off(make_env, analyzer, photo):
    env = await make_env(gate={"idle_camera": {"enabled": False}})
    spec = SceneSpec(seconds=3.0, actors=(), seed=4)
    _, _, session, term = await _run_gate(env, analyzer, photo, spec)
    assert term.camera == []
    assert session.camera_fps is None
