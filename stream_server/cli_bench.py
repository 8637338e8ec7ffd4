"""``facepay bench``: N concurrent real checkout (or gate) terminals against one server.

Without ``--server`` it starts ``facepay serve --dev`` in a temporary data folder (its own
Redis, or an empty one named by ``--redis-url``, never FACEPAY_REDIS_URL) as a separate
process. It then provisions a merchant, N checkout terminals and one enrolled shopper
through the admin API, and starts the terminals in separate processes
(:mod:`stream_server.bench_terminal`), each streaming VP8 over WebRTC on 127.0.0.1 and
paying back to back for ``--duration`` seconds.

Server-side figures come from the server itself, before and after the run: its
``/metrics`` (frames, raw model inference seconds from onnxruntime's ``run`` calls) and, for
a server this command started, psutil on its process (CPU seconds, peak resident memory).
``overhead_ratio`` = server CPU per decision / model inference per decision, same run.

``--mode gate`` runs N walk-through gates instead, each streaming a looped scene of people
walking through (:mod:`stream_server.bench_gate`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from pipeline.errors import ConfigError
from session.config import load_config
from stream_server import bench_gate, bench_server
from stream_server.bench_report import (
    add_session_counts,
    camera_totals,
    pauses_video,
    plot,
    read_outputs,
    summary,
)
from stream_server.bench_server import THREAD_LOOK_S, BenchError, BenchServer, read_metrics
from stream_server.bench_soak import Sampler
from stream_server.cli import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, emit, say

DATA_ENV = "FACEPAY_TEST_DATA"
DEFAULT_SOURCE = "faces/obama/obama3.jpg"
DEFAULT_ENROLL = "faces/obama/obama.jpg"
PASSPHRASE = "bench-" + "passphrase"
PHONE = "+8613800000000"
TERMINALS_PER_PROCESS = 4
SIGNAL_TERMINALS_PER_PROCESS = 25
BENCH_CONFIG = {
    "limits": {
        "session_starts_per_terminal": {"count": 100_000, "window_s": 60.0},
        "passphrase_attempts_per_terminal": {"count": 100_000, "window_s": 300.0},
        "phone_digits_per_terminal": {"count": 100_000, "window_s": 300.0},
    }
}
#: Seconds given to the terminal processes to encode their video before the common start.
START_DELAY_S = 6.0


def register(sub: Any) -> None:
    """Add ``bench``."""
    p = sub.add_parser("bench", help="N concurrent checkout or gate terminals against a server")
    p.add_argument(
        "source",
        nargs="?",
        help="photo, video or folder the terminals stream (gate: a scene video from "
        "`facepay scene`, its .json beside it)",
    )
    p.add_argument("--server", help="target a running server (needs --admin-token)")
    p.add_argument("--admin-token", default=os.environ.get("FACEPAY_ADMIN_TOKEN"))
    p.add_argument("--redis-url", help="an empty Redis for its server (default: its own)")
    p.add_argument("--models-dir", default=os.environ.get("FACEPAY_MODELS_DIR"))
    p.add_argument(
        "--config",
        help="JSON configuration for the server this command starts (the bench sets its lifted "
        "rate limits and, for gates, the scene's entry window on top)",
    )
    p.add_argument("--terminals", type=int, default=8)
    p.add_argument("--fps", type=float, help="frames per second (checkout 15, gate 30)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of checkouts")
    p.add_argument("--mode", choices=("checkout", "gate"), default="checkout")
    p.add_argument(
        "--people",
        type=int,
        default=3,
        choices=bench_gate.PEOPLE_CHOICES,
        help="gate: the preset scene to walk through when SOURCE is not given",
    )
    p.add_argument("--enroll-photo", help="photo the shopper is enrolled from")
    p.add_argument(
        "--data-dir",
        type=Path,
        help=f"root of the default photos and of the photos a scene names (env {DATA_ENV})",
    )
    p.add_argument("--amount", default="0.01")
    p.add_argument(
        "--gap",
        type=float,
        default=0.3,
        help="seconds before a terminal's next shopper steps up (0.3: back to back)",
    )
    p.add_argument("--live-encode", action="store_true", help="encode every frame (client CPU)")
    p.add_argument(
        "--continuous-video",
        action="store_true",
        help="terminals keep streaming between shoppers (default: they pause, as the web client)",
    )
    p.add_argument("--sweep", help="comma-separated terminal counts for the throughput curve")
    p.add_argument("--plot", type=Path, help="write latency histograms and the curve (PNG)")
    p.add_argument("--raw", type=Path, help="write every session record (JSON lines)")
    p.add_argument(
        "--ws-terminals",
        type=int,
        default=0,
        help="extra terminals on the WebSocket only (load test: checkouts started and cancelled)",
    )
    p.add_argument(
        "--sample-every", type=float, default=5.0, help="seconds between resource samples"
    )
    p.set_defaults(handler=cmd_bench)


def _data_root(args: argparse.Namespace) -> Path:
    """Root of the photos: ``--data-dir``, else FACEPAY_TEST_DATA, else ../shared/data."""
    if args.data_dir:
        return Path(args.data_dir)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark (once, or once per ``--sweep`` count); JSON on stdout."""
    gate = args.mode == "gate"
    if args.fps is None:
        args.fps = 30.0 if gate else 15.0
    if args.terminals < 1 or args.ws_terminals < 0 or args.fps <= 0 or args.duration <= 0:
        say("facepay bench: --terminals, --fps and --duration must be positive")
        return EXIT_USAGE
    if gate and args.ws_terminals:
        say("facepay bench: --ws-terminals is for checkout terminals")
        return EXIT_USAGE
    counts = [args.terminals]
    if args.sweep:
        try:
            counts = sorted({int(c) for c in args.sweep.split(",") if c.strip()})
        except ValueError:
            say("facepay bench: --sweep takes comma-separated integers")
            return EXIT_USAGE
    elif args.plot:
        counts = sorted({1, max(1, args.terminals // 2), args.terminals})
    if args.server and not args.admin_token:
        say("facepay bench: --server needs --admin-token (or FACEPAY_ADMIN_TOKEN)")
        return EXIT_USAGE
    if not args.server and (refused := bench_server.refuse_redis(args.redis_url)):
        say(f"facepay bench: {refused}")
        return EXIT_USAGE
    models_dir = args.models_dir
    if not models_dir and (_data_root(args).parent / "models").is_dir():
        models_dir = str(_data_root(args).parent / "models")  # ../shared/models beside us
    work = Path(tempfile.mkdtemp(prefix="facepay-bench-"))
    try:
        if gate:
            if not (_data_root(args) / "faces").is_dir():
                say(f"facepay bench: photos not found in {_data_root(args)} (--data-dir)")
                return EXIT_USAGE
            try:
                # Where the gate's decision clock starts: the walkers' reach times use it.
                min_face_px = load_config(args.config).gate.min_face_px
            except ConfigError as exc:
                say(f"facepay bench: {exc}")
                return EXIT_USAGE
            try:
                scene = bench_gate.gate_scene(
                    args.source, args.people, models_dir, _data_root(args), work, min_face_px
                )
            except (OSError, ValueError) as exc:
                say(f"facepay bench: {exc} (a gate SOURCE is a scene video with its .json)")
                return EXIT_USAGE
            job: _Job = _GateJob(scene)
            config = bench_gate.server_config(BENCH_CONFIG, scene)
        else:
            checkout = _checkout_job(args)
            if isinstance(checkout, str):
                say(f"facepay bench: {checkout}")
                return EXIT_USAGE
            job, config = checkout, BENCH_CONFIG
        with BenchServer(args, models_dir, config) as server:
            runs = [asyncio.run(_run(args, server, n, job)) for n in counts]
    except BenchError as exc:
        say(f"facepay bench: {exc}")
        emit({"error": "bench_failed", "message": str(exc)})
        return EXIT_USAGE
    finally:
        shutil.rmtree(work, ignore_errors=True)
    main = next((r for r in runs if r["terminals"] == args.terminals), runs[-1])
    if args.plot:
        plot(args.plot, runs)
    if args.raw:
        args.raw.write_text("".join(json.dumps(rec) + "\n" for rec in main["_records"]))
    result = {k: v for k, v in main.items() if k != "_records"}
    if len(runs) > 1:
        keys = _SWEEP_KEYS + (("decision_ms", "decisions") if gate else ("confirm_ms", "sessions"))
        result["sweep"] = [{k: r[k] for k in keys} for r in runs]
    if args.plot:
        result["plot"] = str(args.plot)
    emit(result)
    if gate:
        ok = result["wrong_opens"] == 0 and not result["terminal_errors"]
        return EXIT_OK if ok else EXIT_REFUSED
    # A terminal that died (hello, offer or reconnect timed out) stops making sessions, so
    # none of its remaining time counts as lost: it fails the run by itself.
    ok = result["sessions"]["lost"] == 0 and not result["terminal_errors"]
    return EXIT_OK if ok else EXIT_REFUSED


class _CheckoutJob:
    """Checkout terminals paying back to back: what they stream, whom to enrol."""

    def __init__(self, source: str, enroll: str) -> None:
        self.source, self.enroll = source, enroll


class _GateJob:
    """Gate terminals walking a looped scene through (bench_gate)."""

    def __init__(self, scene: bench_gate.GateScene) -> None:
        self.scene = scene
        self.source = str(scene.video)


_Job = _CheckoutJob | _GateJob


def _checkout_job(args: argparse.Namespace) -> _CheckoutJob | str:
    """The checkout terminals' source and the shopper's photo, or what is wrong with them."""
    source = args.source or str(_data_root(args) / DEFAULT_SOURCE)
    enroll = args.enroll_photo or (
        str(_data_root(args) / DEFAULT_ENROLL) if args.source is None else args.source
    )
    for path in (source, enroll):
        if not Path(path).exists():
            return f"{path} not found (set {DATA_ENV} or pass SOURCE)"
    if Path(enroll).is_dir() or Path(enroll).suffix.lower() not in (".jpg", ".jpeg", ".png"):
        return "pass --enroll-photo PHOTO when SOURCE is not a photo"
    return _CheckoutJob(source, enroll)


_SWEEP_KEYS = ("terminals", "decisions_per_s", "cpu_ms_per_decision")


async def _provision(
    http: aiohttp.ClientSession, server: BenchServer, n: int, enroll: str, run: str
) -> list[str]:
    merchant = await server.post(http, "/api/merchants", json={"name": f"Bench {run}"})
    tokens = []
    for _ in range(n):
        body = {"merchant_id": merchant["merchant_id"], "mode": "checkout"}
        tokens.append((await server.post(http, "/api/terminals", json=body))["token"])
    if server.enrolled:
        return tokens  # one shopper per server: a second enrolment of the face is a twin
    server.enrolled = True
    form = aiohttp.FormData()
    for key, value in (
        ("account_id", f"bench-{run}"),
        ("name", "Bench Shopper"),
        ("phone", PHONE),
        ("passphrase", PASSPHRASE),
        ("consent", "true"),
    ):
        form.add_field(key, value)
    form.add_field("image", Path(enroll).read_bytes(), filename=Path(enroll).name)
    try:
        await server.post(http, "/api/accounts", data=form)
    except BenchError as exc:
        # A server targeted with --server keeps the shopper an earlier run enrolled (same
        # phone and passphrase); it refuses the face a second account, and that one pays.
        if "already_enrolled" not in str(exc):
            raise
    return tokens


async def _run(args: argparse.Namespace, server: BenchServer, n: int, job: _Job) -> dict[str, Any]:
    run = secrets.token_hex(3)
    gate = job.scene if isinstance(job, _GateJob) else None
    # Each walker's frame in a pass where the gate's decision clock starts (camera_to_open_ms).
    reach_frames = gate.reach_frames(args.fps) if gate is not None else {}
    async with aiohttp.ClientSession() as http:
        m = args.ws_terminals
        if gate is not None:
            tokens = await bench_gate.provision(http, server, n, gate, _data_root(args), run)
        else:
            assert isinstance(job, _CheckoutJob)
            tokens = await _provision(http, server, n + m, job.enroll, run)
        tmp = Path(tempfile.mkdtemp(prefix="facepay-bench-terms-"))
        procs = []
        start_at = time.time() + START_DELAY_S
        groups = _groups(range(n), TERMINALS_PER_PROCESS, video=True)
        groups += _groups(range(n, n + m), SIGNAL_TERMINALS_PER_PROCESS, video=False)
        for p, (video, members) in enumerate(groups):
            spec = {
                "server": server.url,
                "tokens": [[i, tokens[i]] for i in members] if video else [],
                "signal_tokens": [] if video else [[i, tokens[i]] for i in members],
                "run": run,
                "fps": args.fps,
                "duration_s": args.duration,
                "source": job.source,
                "amount": args.amount,
                "gap_s": args.gap,
                "passphrase": PASSPHRASE,
                "phone_last4": PHONE[-4:],
                "live_encode": args.live_encode,
                "pause_video": pauses_video(args),
                "start_at": start_at,
            }
            if gate is not None:  # gates start staggered over one pass of the scene
                spec.update(mode="gate", period_s=gate.period_s, stagger_s=gate.period_s / n)
                spec["reach_frames"] = sorted(set(reach_frames.values()))
            path = tmp / f"terminals-{p}.json"
            path.write_text(json.dumps(spec))
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "stream_server.bench_terminal",
                    str(path),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            )
        await asyncio.sleep(max(0.0, start_at - time.time()))
        before, cpu0 = await read_metrics(http, server.url), server.cpu_s()
        redis0 = server.redis_cpu_s()
        peak, next_sample, next_look = 0.0, 0.0, time.monotonic() + THREAD_LOOK_S
        sampler = Sampler(server.pid, server.redis_url)
        waits = [asyncio.ensure_future(p.communicate()) for p in procs]
        limit = time.monotonic() + args.duration + 90
        while not all(w.done() for w in waits) and time.monotonic() < limit:
            rss = server.rss_mb()
            if rss is None or time.monotonic() >= next_look:
                # A look at /metrics now and then also lets the server see its decoder
                # threads alive: their CPU counts by role only if a read saw them.
                next_look = time.monotonic() + THREAD_LOOK_S
                look = (await read_metrics(http, server.url))["rss"] / 2**20
                rss = look if rss is None else rss
            peak = max(peak, rss)
            if time.monotonic() >= next_sample:
                next_sample = time.monotonic() + args.sample_every
                await sampler.sample(rss)
            await asyncio.wait(waits, timeout=0.5)
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
        outs = await asyncio.gather(*waits)
        after, cpu1 = await read_metrics(http, server.url), server.cpu_s()
        redis1 = server.redis_cpu_s()
        if redis0 is not None and redis1 is not None:
            before["redis_cpu_s"], after["redis_cpu_s"] = redis0, redis1
        await asyncio.sleep(1.0)  # let the last sessions' teardown finish before the last look
        await sampler.sample(server.rss_mb())
        await sampler.close()
    shutil.rmtree(tmp, ignore_errors=True)
    records, errors, ends = read_outputs(outs)
    frames_sent = sum(int(rec.get("frames_sent", 0)) for rec in ends)
    reconnects = sum(int(rec.get("reconnects", 0)) for rec in ends)
    if gate is not None:
        async with aiohttp.ClientSession() as http:
            names = server.gate_names.items()
            reach = {a: reach_frames[name] for a, name in names if name in reach_frames}
            verdict = await bench_gate.judge(
                http, server.get, records, bench_gate.passes_from(ends), server.gate_accounts, reach
            )
        decisions = int(after["gate_decisions"] - before["gate_decisions"])
        counters = (before, after, cpu0, cpu1)
        result = bench_gate.gate_summary(
            n, args, gate, records, verdict, decisions, frames_sent, counters
        )
        result.update(peak_rss_mb=round(peak, 1), terminal_errors=errors, _records=records)
        result["resources"] = sampler.summary(r["t"] for r in records if r["gate"] == "open")
        result["video_reconnects"] = reconnects
        result["camera"] = camera_totals(ends)  # gate.idle_camera requests
        if result["decisions"]["repeats"] and args.server:
            say(
                "bench: the server counted repeats (walkers inside its entry window): give it "
                f"policy.gate_entry_window_s <= {gate.window_s} for this scene (docs/gate.md)"
            )
        return result
    signal = [r for r in records if r.get("video") is False]
    records = [r for r in records if r.get("video") is not False]
    result = summary(n, args, records, errors, frames_sent, before, after, cpu0, cpu1, peak)
    add_session_counts(result, records, signal, errors, m)
    approved = (r["t"] for r in records if r.get("outcome") == "approved" and "t" in r)
    result["resources"] = sampler.summary(approved)
    result["camera"] = camera_totals(ends)  # checkout.camera_fps, after every answer
    # Terminals whose video connection died (the server said video_lost, or ICE failed on
    # their side) and that offered a new one, as a kiosk would.
    result["video_reconnects"] = reconnects
    return result


def _groups(indices: range, per: int, video: bool) -> list[tuple[bool, list[int]]]:
    items = list(indices)
    return [(video, items[i : i + per]) for i in range(0, len(items), per)]
