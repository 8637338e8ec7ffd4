"""``facepay bench-gate [SCENE]``: a walk-through scene through a real gate, measured.

The server runs in this process (so its CPU time is ours to measure, ``os.times``); the gate
terminal is a separate ``facepay replay --mode gate`` process streaming the pre-rendered
scene video over WebRTC on 127.0.0.1, as a camera would. People in the scene marked
``enrolled`` are enrolled first from their ``enroll_photo``. Results are judged by account,
from the ledger: a ``gate_open`` whose payment belongs to anyone but an enrolled live
walker (the print attacker's victim included) is a wrong open; an enrolled live walker
without an open is missed.

It runs in its own private Redis, or in an empty database named by ``--redis-url``; never
in ``FACEPAY_REDIS_URL`` (an operator's production Redis), and it never empties one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from stream_server.cli import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, emit, say

DATA_ENV = "FACEPAY_TEST_DATA"


def register(sub: Any) -> None:
    """Add ``bench-gate``."""
    p = sub.add_parser("bench-gate", help="measure gate decisions on a walk-through scene")
    p.add_argument("scene", nargs="?", type=Path, help="scene video (with its .json beside)")
    p.add_argument(
        "--redis-url",
        help="an empty Redis database to run in (never FACEPAY_REDIS_URL; default: its own)",
    )
    p.add_argument("--models-dir", default=os.environ.get("FACEPAY_MODELS_DIR"))
    p.add_argument(
        "--data-dir",
        type=Path,
        default=os.environ.get(DATA_ENV),
        help="root of the photos the scene names (env FACEPAY_TEST_DATA)",
    )
    p.add_argument(
        "--people",
        type=int,
        default=3,
        choices=(1, 3, 5),
        help="preset scene to generate when SCENE is not given",
    )
    p.add_argument("--fps", type=float, default=30.0)
    p.set_defaults(handler=cmd_bench_gate)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[k], 1)


def cmd_bench_gate(args: argparse.Namespace) -> int:
    """Run the benchmark; JSON out (DESIGN.md §5 keys)."""
    data_root = args.data_dir or Path(__file__).resolve().parents[2] / "shared" / "data"
    if not Path(data_root, "faces").is_dir():
        say(f"facepay bench-gate: photos not found in {data_root} (set {DATA_ENV})")
        return EXIT_USAGE
    from stream_server.bench_server import refuse_redis

    # Before anything starts: the server writes (the audit cap) as it starts up.
    if refused := refuse_redis(args.redis_url):
        say(f"facepay bench-gate: {refused}")
        return EXIT_USAGE
    from stream_server.cli_server import event_loop_factory

    # The server runs in this process: on the loop `facepay serve` would choose by default.
    _, loop_factory = event_loop_factory("auto")
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_bench(args, Path(data_root)))
    except KeyboardInterrupt:
        return EXIT_REFUSED


async def _bench(args: argparse.Namespace, data_root: Path) -> int:
    from pipeline.analyzer import FaceAnalyzer
    from pipeline.config import PipelineConfig
    from pipeline.image import load_image
    from pipeline.models import ModelStore
    from pipeline.scene import reach_times, render_scene
    from pipeline.scene_presets import (
        largest_face_box,
        preset_scene,
        scene_from_json,
        write_scene,
    )
    from session.config import FacePayConfig, ServerConfig
    from session.crypto import TemplateCipher, generate_key
    from session.enrollment import enroll_from_images
    from stream_server.app import (
        ANALYZER,
        CONNECTIONS,
        DIRECTORY,
        EXECUTOR,
        HASHER,
        METRICS,
        STORE,
        create_app,
    )
    from stream_server.embedded_redis import EmbeddedRedis
    from stream_server.webrtc import restrict_host_addresses

    work = Path(tempfile.mkdtemp(prefix="facepay-bench-gate-"))
    config = FacePayConfig(server=ServerConfig(workers=2))
    analyzer = FaceAnalyzer.from_config(PipelineConfig(), ModelStore(args.models_dir))
    face_box = largest_face_box(analyzer.detect)

    def load(rel: str) -> Any:
        return load_image(data_root / rel)

    px = config.gate.min_face_px
    if args.scene is None:
        spec = preset_scene(args.people)
        video = work / "scene.avi"
        say(f"bench-gate: rendering a {args.people}-person scene to {video}")
        written = write_scene(spec, video, load, face_box, px)
        reach = written["reach_s"]
    else:
        video = args.scene
        spec = scene_from_json(json.loads(video.with_suffix(".json").read_text()))
        # Where each walker's decision clock starts, from the scene's own ground truth.
        truth = (states for _, states in render_scene(spec, load, face_box))
        reach = reach_times(truth, spec.fps, px)

    embedded = None
    redis_url = args.redis_url
    if redis_url is None:
        embedded = EmbeddedRedis(work / "data")
        redis_url = embedded.start()
    restrict_host_addresses(["127.0.0.1"])
    app = create_app(
        config,
        cipher=TemplateCipher(generate_key()),
        redis_url=redis_url,
        models_dir=args.models_dir,
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        store = app[STORE]
        merchant = await store.add_merchant("Metro")
        _, token = await store.add_terminal(merchant.merchant_id, "gate")
        walkers: dict[str, str] = {}
        for actor in spec.actors:
            if not actor.enrolled or actor.enroll_photo is None:
                continue
            if actor.name in walkers:
                continue
            await enroll_from_images(
                store=store,
                directory=app[DIRECTORY],
                analyzer=app[ANALYZER],
                hasher=app[HASHER],
                executor=app[EXECUTOR],
                account_id=actor.name,
                name=actor.name.replace("_", " ").title(),
                phone=f"+86138000001{len(walkers):02d}",  # one each: distinct people
                passphrase="bench-gate-passphrase",
                images=[load_image(data_root / actor.enroll_photo)],
                consent={"method": "bench"},
            )
            walkers[actor.name] = actor.kind
        cpu0 = os.times()
        sessions: set[Any] = set()
        replay = asyncio.create_task(_replay(port, token, video, args.fps, spec.seconds))
        while not replay.done():
            # Keep the gate sessions (they leave CONNECTIONS when the terminal hangs up).
            sessions.update(c.session for c in app[CONNECTIONS] if c.session is not None)
            await asyncio.wait({replay}, timeout=0.2)
        events = replay.result()
        trace = [row for sess in sessions for row in getattr(sess, "trace", ())]
        cpu1 = os.times()
        result = await _judge(spec, events, store, walkers, reach)
        decisions = result["decisions"]
        cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        metrics = app[METRICS]
        result["frames"] = {
            "received": int(metrics.frames_received._value.get()),
            "processed": int(metrics.frames_processed._value.get()),
            "dropped": int(metrics.frames_dropped._value.get()),
        }
        result["cpu_ms_per_decision"] = round(cpu_s * 1000 / decisions, 1) if decisions else None
        result["server_cpu_s"] = round(cpu_s, 2)
        if trace:
            result["frame_age_ms_p50"] = round(statistics.median(r[1] for r in trace), 1)
            result["analysis_ms_p50"] = round(statistics.median(r[2] for r in trace), 1)
        result["scene"] = str(video)
        emit(result)
        return EXIT_OK if result["wrong_opens"] == 0 else EXIT_REFUSED
    finally:
        await runner.cleanup()
        if embedded is not None:
            embedded.stop()
        # The private Redis saved the run's enrolments (templates, names, passphrase hashes)
        # on stopping: none of it outlives the run. A rendered preset scene stays, since the
        # result names it; with the user's SCENE nothing else is left.
        shutil.rmtree(work / "data", ignore_errors=True)
        if args.scene is not None:
            shutil.rmtree(work, ignore_errors=True)


async def _replay(
    port: int, token: str, video: Path, fps: float, seconds: float
) -> list[dict[str, Any]]:
    """Run the gate terminal as a separate process; its JSON lines."""
    cmd = [
        sys.executable,
        "-m",
        "stream_server.cli",
        "replay",
        "--server",
        f"http://127.0.0.1:{port}",
        "--token",
        token,
        "--mode",
        "gate",
        "--loopback",
        "--fps",
        str(fps),
        "--duration",
        str(seconds),
        "--timeout",
        str(seconds + 30),
        str(video),
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), seconds + 60)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"replay failed ({proc.returncode}): {err.decode()[-500:]}")
    return [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]


async def _judge(
    spec: Any,
    events: list[dict[str, Any]],
    store: Any,
    walkers: dict[str, str],
    reach: dict[str, float],
) -> dict[str, Any]:
    """The run's decisions judged by account (``walkers``: enrolled name -> kind), and
    ``camera_to_open_ms``: from the scene time at which a live enrolled walker's face
    reached the gate's minimum size (``reach``) to its open at the terminal (``t_ms``, the
    replay's clock since its first frame, which is the scene's)."""
    from stream_server.bench_gate import wrong_opens
    from stream_server.bench_report import latency

    opens = [e for e in events if e.get("type") == "gate_open"]
    denies = [e for e in events if e.get("type") == "gate_deny"]
    live_enrolled = {name for name, kind in walkers.items() if kind == "live"}
    accounts = [(await store.get_payment(e["payment_id"])).account_id for e in opens]
    wrong, opened = wrong_opens(((0, a) for a in accounts), live_enrolled)  # one pass
    latencies = [float(e["decision_ms"]) for e in opens + denies]
    first_opens: dict[str, float] = {}
    for event, account in zip(opens, accounts, strict=True):
        if account in live_enrolled and account in reach and account not in first_opens:
            first_opens[account] = float(event["t_ms"]) - 1000 * reach[account]
    return {
        "people": len(spec.actors),
        "decisions": len(opens) + len(denies),
        "opens": len(opens),
        "denies": {
            r: sum(1 for e in denies if e["reason"] == r)
            for r in sorted({e["reason"] for e in denies})
        },
        "decision_ms": {
            "p50": round(statistics.median(latencies), 1) if latencies else None,
            "p95": _percentile(latencies, 0.95),
            "max": round(max(latencies), 1) if latencies else None,
        },
        # As `facepay bench --mode gate` reports it (nearest-rank quantiles).
        "camera_to_open_ms": latency(list(first_opens.values())),
        "wrong_opens": wrong,
        "missed": sorted(live_enrolled - set(opened.get(0, []))),
    }
