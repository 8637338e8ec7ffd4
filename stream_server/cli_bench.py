"""``facepay bench``: N concurrent real checkout terminals against one server, measured.

Without ``--server`` it starts ``facepay serve --dev`` in a temporary data folder (its own
embedded Redis, or ``--redis-url``) as a separate process, as production runs it. It then
provisions a merchant, N checkout terminals and one enrolled shopper through the admin API,
and starts the terminals in separate processes (:mod:`stream_server.bench_terminal`), each
streaming VP8 over WebRTC on 127.0.0.1 and paying back to back for ``--duration`` seconds.

Server-side figures come from the server itself, before and after the run: its
``/metrics`` (frames, raw model inference seconds from onnxruntime's ``run`` calls) and, for
a server this command started, psutil on its process (CPU seconds, peak resident memory).
``overhead_ratio`` = server CPU per decision / model inference per decision, same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from stream_server.bench_report import pauses_video, plot, summary
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
    }
}
#: Seconds given to the terminal processes to encode their video before the common start.
START_DELAY_S = 6.0


def register(sub: Any) -> None:
    """Add ``bench``."""
    p = sub.add_parser("bench", help="N concurrent checkout terminals against a server")
    p.add_argument("source", nargs="?", help="photo, video or folder the terminals stream")
    p.add_argument("--server", help="target a running server (needs --admin-token)")
    p.add_argument("--admin-token", default=os.environ.get("FACEPAY_ADMIN_TOKEN"))
    p.add_argument("--redis-url", default=os.environ.get("FACEPAY_REDIS_URL"))
    p.add_argument("--models-dir", default=os.environ.get("FACEPAY_MODELS_DIR"))
    p.add_argument("--config", help="JSON configuration for the server this command starts")
    p.add_argument("--terminals", type=int, default=8)
    p.add_argument("--fps", type=float, default=15.0)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of checkouts")
    p.add_argument("--mode", choices=("checkout",), default="checkout")
    p.add_argument("--enroll-photo", help="photo the shopper is enrolled from")
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


def _data_root() -> Path:
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark (once, or once per ``--sweep`` count); JSON on stdout."""
    if args.terminals < 1 or args.ws_terminals < 0 or args.fps <= 0 or args.duration <= 0:
        say("facepay bench: --terminals, --fps and --duration must be positive")
        return EXIT_USAGE
    source = args.source or str(_data_root() / DEFAULT_SOURCE)
    enroll = args.enroll_photo or (
        str(_data_root() / DEFAULT_ENROLL) if args.source is None else args.source
    )
    for path in (source, enroll):
        if not Path(path).exists():
            say(f"facepay bench: {path} not found (set {DATA_ENV} or pass SOURCE)")
            return EXIT_USAGE
    if Path(enroll).is_dir() or Path(enroll).suffix.lower() not in (".jpg", ".jpeg", ".png"):
        say("facepay bench: pass --enroll-photo PHOTO when SOURCE is not a photo")
        return EXIT_USAGE
    if args.server and not args.admin_token:
        say("facepay bench: --server needs --admin-token (or FACEPAY_ADMIN_TOKEN)")
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
    try:
        with _Server(args) as server:
            runs = [asyncio.run(_run(args, server, n, source, enroll)) for n in counts]
    except _BenchError as exc:
        say(f"facepay bench: {exc}")
        emit({"error": "bench_failed", "message": str(exc)})
        return EXIT_USAGE
    main = next((r for r in runs if r["terminals"] == args.terminals), runs[-1])
    if args.plot:
        plot(args.plot, runs)
    if args.raw:
        args.raw.write_text("".join(json.dumps(rec) + "\n" for rec in main["_records"]))
    result = {k: v for k, v in main.items() if k != "_records"}
    if len(runs) > 1:
        result["sweep"] = [{k: r[k] for k in _SWEEP_KEYS} for r in runs]
    if args.plot:
        result["plot"] = str(args.plot)
    emit(result)
    return EXIT_OK if result["sessions"]["lost"] == 0 else EXIT_REFUSED


_SWEEP_KEYS = ("terminals", "decisions_per_s", "confirm_ms", "cpu_ms_per_decision", "sessions")


class _BenchError(Exception):
    pass


class _Server:
    """The server under test: started here (``facepay serve --dev``) or given by URL."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.tmp: Path | None = None
        self.url: str = args.server or ""
        self.admin_token: str = args.admin_token or ""
        self.enrolled = False
        self.pid: int | None = None
        self.redis_url: str | None = args.redis_url

    def __enter__(self) -> _Server:
        if self.url:
            return self
        self.tmp = Path(tempfile.mkdtemp(prefix="facepay-bench-"))
        cmd = [sys.executable, "-m", "stream_server.cli", "serve", "--dev", "--port", "0"]
        cmd += ["--data-dir", str(self.tmp / "data")]
        if self.args.redis_url:
            cmd += ["--redis-url", self.args.redis_url]
        models_dir = self.args.models_dir
        if not models_dir and (_data_root().parent / "models").is_dir():
            models_dir = str(_data_root().parent / "models")  # ../shared/models beside us
        if models_dir:
            cmd += ["--models-dir", models_dir]
        config = self.args.config
        if not config:
            # The bench's kiosks pay every second or so; a real one serves a shopper every
            # ~20 s, which is what the per-terminal limits are set for. Lift only those.
            config = str(self.tmp / "bench-config.json")
            Path(config).write_text(json.dumps(BENCH_CONFIG))
        cmd += ["--config", config]
        env = {k: v for k, v in os.environ.items() if k != "FACEPAY_ADMIN_TOKEN"}
        log = (self.tmp / "server.log").open("w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("{"):
            self.__exit__()
            raise _BenchError(f"the server did not start; see {self.tmp / 'server.log'}")
        first = json.loads(line)
        if "url" not in first:
            self.__exit__()
            raise _BenchError(f"the server did not start: {first.get('message', first)}")
        self.url = first["url"]
        self.pid = self.proc.pid
        if not self.redis_url and str(first.get("redis_url", "")).startswith("unix://"):
            self.redis_url = first["redis_url"]  # the embedded one (no password to redact)
        self.admin_token = (self.tmp / "data" / "admin.token").read_text().strip()
        say(f"bench: server {self.url} (pid {self.proc.pid}, log {self.tmp / 'server.log'})")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def cpu_s(self) -> float | None:
        """CPU seconds of the server process itself (not its embedded Redis)."""
        if self.proc is None:
            return None
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def rss_mb(self) -> float | None:
        if self.proc is None:
            return None
        import psutil

        return float(psutil.Process(self.proc.pid).memory_info().rss) / 2**20


async def _admin(http: aiohttp.ClientSession, server: _Server, path: str, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    async with http.post(server.url + path, headers=headers, **kw) as resp:
        body = await resp.json(content_type=None)
        if resp.status >= 300:
            raise _BenchError(f"POST {path}: {resp.status} {body}")
        return body


#: Seconds between the bench's reads of /metrics during a run (thread CPU by role).
THREAD_LOOK_S = 2.0


async def _metrics(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The server's counters we use, summed over labels."""
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
        if resp.status != 200:
            raise _BenchError(f"GET /metrics: {resp.status}")
    wanted = {
        "facepay_frames_received_total": "received",
        "facepay_frames_processed_total": "processed",
        "facepay_frames_dropped_total": "dropped",
        "facepay_frames_undecoded_total": "undecoded",
        "facepay_model_seconds_total": "model_s",
        "facepay_work_seconds_total": "argon2_s",
        "process_cpu_seconds_total": "cpu_s",
        "process_resident_memory_bytes": "rss",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m and m.group(1) in wanted:
            out[wanted[m.group(1)]] += float(m.group(3))
        elif m and m.group(1) == "facepay_thread_cpu_seconds_total":
            role = re.search(r'role="([a-z_]+)"', m.group(2) or "")
            if role:  # CPU by thread role: "thread:event_loop", "thread:workers", ...
                out[f"thread:{role.group(1)}"] = float(m.group(3))
    return out


async def _provision(
    http: aiohttp.ClientSession, server: _Server, n: int, enroll: str, run: str
) -> list[str]:
    merchant = await _admin(http, server, "/api/merchants", json={"name": f"Bench {run}"})
    tokens = []
    for _ in range(n):
        body = {"merchant_id": merchant["merchant_id"], "mode": "checkout"}
        tokens.append((await _admin(http, server, "/api/terminals", json=body))["token"])
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
    await _admin(http, server, "/api/accounts", data=form)
    return tokens


async def _run(
    args: argparse.Namespace, server: _Server, n: int, source: str, enroll: str
) -> dict[str, Any]:
    run = secrets.token_hex(3)
    async with aiohttp.ClientSession() as http:
        m = args.ws_terminals
        tokens = await _provision(http, server, n + m, enroll, run)
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
                "source": source,
                "amount": args.amount,
                "gap_s": args.gap,
                "passphrase": PASSPHRASE,
                "phone_last4": PHONE[-4:],
                "live_encode": args.live_encode,
                "pause_video": pauses_video(args),
                "start_at": start_at,
            }
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
        before, cpu0 = await _metrics(http, server.url), server.cpu_s()
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
                look = (await _metrics(http, server.url))["rss"] / 2**20
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
        after, cpu1 = await _metrics(http, server.url), server.cpu_s()
        await asyncio.sleep(1.0)  # let the last sessions' teardown finish before the last look
        await sampler.sample(server.rss_mb())
        await sampler.close()
    shutil.rmtree(tmp, ignore_errors=True)
    records, errors, frames_sent, reconnects = [], [], 0, 0
    for out, err in outs:
        for line in out.decode().splitlines():
            rec = json.loads(line)
            if "order_id" in rec:
                records.append(rec)
            elif "terminal_error" in rec:
                errors.append(rec)
            else:
                frames_sent += int(rec.get("frames_sent", 0))
                reconnects += int(rec.get("reconnects", 0))
        if not out and err:
            errors.append({"stderr": err.decode()[-400:]})
    signal = [r for r in records if r.get("video") is False]
    records = [r for r in records if r.get("video") is not False]
    result = summary(n, args, records, errors, frames_sent, before, after, cpu0, cpu1, peak)
    if m:
        bad = sum(1 for r in signal if r["outcome"] != "cancelled")
        result["ws_terminals"] = m
        result["ws_sessions"] = {"started": len(signal), "ok": len(signal) - bad, "errors": bad}
    all_sessions = len(records) + len(signal)
    failed = result["sessions"]["lost"] + result.get("ws_sessions", {}).get("errors", 0)
    result["error_rate"] = round(failed / all_sessions, 4) if all_sessions else None
    result["resources"] = sampler.summary(result["sessions"]["approved"])
    # Terminals whose video connection died (the server said video_lost, or ICE failed on
    # their side) and that offered a new one, as a kiosk would.
    result["video_reconnects"] = reconnects
    return result


def _groups(indices: range, per: int, video: bool) -> list[tuple[bool, list[int]]]:
    items = list(indices)
    return [(video, items[i : i + per]) for i in range(0, len(items), per)]
