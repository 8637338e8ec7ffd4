"""``facepay bench --mode gate``: N walk-through gates on one server at once, measured.

Each gate terminal streams a walk-through scene (:mod:`pipeline.scene`: real photos of
people crossing a corridor, one of them not enrolled, in the 5-person scene a print attacker
too) over real WebRTC, in a loop, for the run's duration. One pass of the loop is the scene
and then an empty corridor as long as the entry window, so that the walkers of one pass can
never fall into the window of the next (:func:`gate_scene`). Each gate is provisioned for
a merchant of its own (a station each): an account's entry window is per merchant, so the
same walkers can pass every gate. The gates start their passes staggered over one pass, as
gates in a station are not in step.

The figures are those of the checkout bench (:func:`stream_server.bench_report.server_figures`:
CPU and model time per decision, their ratio, frames, memory), with ``decision_ms`` (the
gate's own clock: from the frame in which a face reached the gate's minimum size to the
decision) in place of the time to ``confirm``, and the decisions judged from the ledger:
``wrong_opens`` (an open for anyone but a live enrolled walker, or a second open of one
walker in one pass), ``missed`` (a live enrolled walker without an open in a complete
pass) and ``camera_to_open_ms`` (from the camera's frame in which a walker's face reached
the gate's minimum size, by the scene's ground truth, to the open at the terminal). A
decision, for CPU per decision, is every gate decision the server counted
(``facepay_decisions_total{mode="gate"}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from stream_server.bench_report import latency, server_figures
from stream_server.bench_server import BenchServer
from stream_server.bench_terminal import BenchTerminal

#: Preset scenes (``facepay bench --mode gate --people N`` without SOURCE).
PEOPLE_CHOICES = (1, 3, 5)
#: Added to the longest walk of an enrolled person to make the entry window.
WINDOW_MARGIN_S = 0.5
#: What a gate terminal listens for.
_EVENTS = {"gate_open", "gate_deny", "error", "_closed"}


@dataclass(frozen=True)
class GateScene:
    """The looped scene every gate streams, and what the bench expects of it."""

    video: Path
    #: One pass: the scene, then an empty corridor as long as ``window_s``.
    period_s: float
    #: The server's ``policy.gate_entry_window_s`` for the run.
    window_s: float
    people: int
    #: (actor name, kind "live"/"print", enrolment photo) of everyone enrolled.
    enrolled: tuple[tuple[str, str, str], ...]
    #: Scene time at which each walker's face reached the gate's ``min_face_px``.
    reach_s: tuple[tuple[str, float], ...] = ()

    def reach_frames(self, fps: float) -> dict[str, int]:
        """Each walker's :attr:`reach_s` as the index of the camera's frame at ``fps``."""
        return {name: math.ceil(t * fps - 1e-6) for name, t in self.reach_s}


def gate_scene(
    source: str | None,
    people: int,
    models_dir: str | None,
    data_root: Path,
    work: Path,
    min_face_px: float,
) -> GateScene:
    """Render the looped scene to ``work`` (from SOURCE's ``.json`` spec, or a preset), with
    the time each walker's face reaches ``min_face_px`` (the server's ``gate.min_face_px``).

    SOURCE is a scene video written by ``facepay scene`` with its spec beside it; the scene
    is rendered again from the spec, longer, because the corridor must be empty between
    passes (the last frames of a video may show a walker). The photos come from
    ``data_root``.
    """
    from pipeline.analyzer import FaceAnalyzer
    from pipeline.config import PipelineConfig
    from pipeline.image import load_image
    from pipeline.models import ModelStore
    from pipeline.scene_presets import (
        largest_face_box,
        preset_scene,
        scene_from_json,
        write_scene,
    )

    if source is None:
        spec = preset_scene(people)
    else:
        spec = scene_from_json(json.loads(Path(source).with_suffix(".json").read_text()))
    enrolled = [a for a in spec.actors if a.enrolled and a.enroll_photo]
    live = [a for a in enrolled if a.kind == "live"]
    if not live:
        raise ValueError("the scene has no enrolled live walker: nothing for a gate to open")
    last_exit = max(a.exit_s for a in spec.actors)
    walk = max(a.exit_s - a.enter_s for a in enrolled)
    window = round(walk + WINDOW_MARGIN_S, 2)
    period = round(max(spec.seconds, last_exit) + window, 2)
    analyzer = FaceAnalyzer.from_config(PipelineConfig(), ModelStore(models_dir))
    video = work / "gate-scene.avi"
    written = write_scene(
        replace(spec, seconds=period),
        video,
        lambda rel: load_image(data_root / rel),
        largest_face_box(analyzer.detect),
        reach_px=min_face_px,
    )
    reach = written["reach_s"]
    return GateScene(
        video=video,
        period_s=period,
        window_s=window,
        people=len(spec.actors),
        enrolled=tuple((a.name, a.kind, str(a.enroll_photo)) for a in enrolled),
        # A walker whose face never gets that big (a small scene, a large min_face_px) is
        # judged as before but not timed.
        reach_s=tuple(sorted((a.name, reach[a.name]) for a in live if a.name in reach)),
    )


def server_config(base: dict[str, Any], scene: GateScene) -> dict[str, Any]:
    """The bench server's config: ``base`` plus the scene's entry window, and a daily limit
    that thousands of fares in one run do not reach."""
    policy = {"gate_entry_window_s": scene.window_s, "daily_limit": 10**10}
    return {**base, "policy": {**base.get("policy", {}), **policy}}


async def provision(
    http: aiohttp.ClientSession,
    server: BenchServer,
    n: int,
    scene: GateScene,
    data_root: Path,
    run: str,
) -> list[str]:
    """N gate terminals, one merchant each, and the scene's walkers enrolled (once per
    server: a second enrolment of one face would be a twin). Their tokens."""
    tokens = []
    for i in range(n):
        merchant = await server.post(http, "/api/merchants", json={"name": f"Gate {run}-{i}"})
        body = {"merchant_id": merchant["merchant_id"], "mode": "gate"}
        tokens.append((await server.post(http, "/api/terminals", json=body))["token"])
    if server.gate_accounts:
        return tokens
    for k, (name, kind, photo) in enumerate(scene.enrolled):
        form = aiohttp.FormData()
        account_id = f"gate-{name}-{run}".replace("_", "-")
        for key, value in (
            ("account_id", account_id),
            ("name", name.replace("_", " ").title()),
            ("phone", f"+86138000001{k:02d}"),
            ("passphrase", "bench-gate-" + "passphrase"),
            ("consent", "true"),
        ):
            form.add_field(key, value)
        path = Path(photo) if Path(photo).is_absolute() else data_root / photo
        form.add_field("image", path.read_bytes(), filename=path.name)
        await server.post(http, "/api/accounts", data=form)
        server.gate_accounts[account_id] = kind
        server.gate_names[account_id] = name
    return tokens


class GateBenchTerminal(BenchTerminal):
    """One gate: streams the looped scene from ``delay_s`` on, reports every decision.

    Each ``gate_open`` / ``gate_deny`` becomes one JSON line on stdout with the pass of the
    loop it belongs to and the time since each walker's reach frame, both from the frames
    the camera played (:meth:`PacketTrack.since_played`). A gate whose video
    connection dies offers a new one, as a gate controller would. The server's ``camera``
    messages (a lower frame rate while the corridor is empty, ``max_fps``; full rate again
    with None) go to the track as for every bench terminal (:meth:`BenchTerminal._camera`).
    """

    def __init__(
        self, spec: dict[str, Any], token: str, index: int, track: Any, delay_s: float
    ) -> None:
        super().__init__(spec, token, index, track)
        self.delay_s = delay_s

    async def _work(self, ws: aiohttp.ClientWebSocketResponse, end: float) -> None:
        """Wait for this gate's turn in the stagger, stream and listen until ``end``."""
        await asyncio.sleep(self.delay_s)
        await self._start_video(ws)
        while (left := end - time.monotonic()) > 0:
            try:
                event = await self._expect(_EVENTS, left)
            except TimeoutError:
                break
            if event["type"] == "_closed":
                raise ConnectionError("server closed the WebSocket")
            if event["type"] == "error":
                if event.get("code") == "video_lost":
                    self.reconnects += 1
                    await self._start_video(ws)
                continue
            self._report(event)

    def _report(self, event: dict[str, Any]) -> None:
        # The pass the camera is playing: a walker is decided while in view, and the empty
        # corridor after the scene (at least the entry window) keeps a late event inside
        # its own pass. With the time since each walker's face reached the gate's minimum
        # size in this pass (``reach_frames``), for ``camera_to_open_ms``.
        track = self.track
        since = {}
        for index in self.spec.get("reach_frames", []):
            seconds = track.since_played(int(index))
            if seconds is not None:
                since[str(index)] = round(seconds * 1000, 1)
        rec = {
            "terminal": self.index,
            "gate": "open" if event["type"] == "gate_open" else "deny",
            "reason": event.get("reason"),
            "decision_ms": float(event["decision_ms"]),
            "payment_id": event.get("payment_id"),
            "pass": track.passes,
            "since_reach_ms": since,
            "t": round(time.time(), 3),
        }
        print(json.dumps(rec), flush=True)


def wrong_opens(
    opens: Iterable[tuple[Hashable, str]], live: set[str]
) -> tuple[int, dict[Hashable, list[str]]]:
    """(wrong opens, accounts opened per pass) from (pass key, account id) per open.

    An open is wrong if its account is not a live enrolled walker's (a stranger, a print's
    victim) or if that walker was already let through in the same pass.
    """
    opened: dict[Hashable, list[str]] = {}
    wrong = 0
    for key, account_id in opens:
        if account_id not in live or account_id in opened.get(key, []):
            wrong += 1
        opened.setdefault(key, []).append(account_id)
    return wrong, opened


async def judge(
    http: aiohttp.ClientSession,
    get: Callable[[aiohttp.ClientSession, str], Awaitable[Any]],
    records: list[dict[str, Any]],
    passes: dict[int, int],
    accounts: dict[str, str],
    reach_frames: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Wrong opens and missed walkers, from the ledger (each open's payment), and
    ``camera_to_open_ms``: for each walker's first open in a pass, the time from the
    camera's frame in which the walker's face reached the gate's minimum size to the open
    at the terminal.

    ``passes``: complete passes per terminal; ``accounts``: account id -> kind of every
    enrolled walker; ``reach_frames``: account id -> that frame's index in a pass.
    """
    live = {a for a, kind in accounts.items() if kind == "live"}
    opens: list[tuple[tuple[int, int], str]] = []
    after: list[float] = []
    for rec in records:
        if rec["gate"] == "open":
            payment = await get(http, f"/api/payments/{rec['payment_id']}")
            key, account = (rec["terminal"], rec["pass"]), str(payment["account_id"])
            first = account in live and (key, account) not in opens
            opens.append((key, account))
            index = (reach_frames or {}).get(account)
            since = rec.get("since_reach_ms", {}).get(str(index))
            if first and since is not None:
                after.append(float(since))
    wrong, opened = wrong_opens(opens, live)
    missed = sum(
        len(live - set(opened.get((terminal, p), [])))
        for terminal, count in passes.items()
        for p in range(count)
    )
    expected = len(live) * sum(passes.values())
    return {
        "wrong_opens": wrong,
        "missed": missed,
        "expected_opens": expected,
        "camera_to_open_ms": latency(after),
    }


def gate_summary(
    n: int,
    args: Any,
    scene: GateScene,
    records: list[dict[str, Any]],
    verdict: dict[str, Any],
    server_decisions: int,
    frames_sent: int,
    counters: tuple[dict[str, float], dict[str, float], float | None, float | None],
) -> dict[str, Any]:
    """One gate run's JSON (the checkout bench's server figures, gate decisions judged)."""
    before, after, cpu0, cpu1 = counters
    denies: dict[str, int] = {}
    for rec in records:
        if rec["gate"] == "deny":
            denies[rec["reason"]] = denies.get(rec["reason"], 0) + 1
    opens = sum(1 for rec in records if rec["gate"] == "open")
    return {
        "mode": "gate",
        "terminals": n,
        "fps": args.fps,
        "duration_s": args.duration,
        "people": scene.people,
        "pass_s": scene.period_s,
        "entry_window_s": scene.window_s,
        "decision_ms": latency([float(r["decision_ms"]) for r in records]),
        "decisions": {
            "server": server_decisions,
            "opens": opens,
            "denies": denies,
            # Counted by the server but not announced: a walker's second track inside the
            # entry window (not charged again).
            "repeats": max(0, server_decisions - len(records)),
        },
        **verdict,
        "decisions_per_s": round(server_decisions / args.duration, 2),
        **server_figures(server_decisions, frames_sent, before, after, cpu0, cpu1),
    }


def passes_from(lines: list[dict[str, Any]]) -> dict[int, int]:
    """Complete passes per gate terminal, from the terminals' last lines."""
    out: dict[int, int] = {}
    with contextlib.suppress(KeyError, TypeError, ValueError):
        for line in lines:
            if "passes" in line:
                out[int(line["terminal"])] = int(line["passes"])
    return out
