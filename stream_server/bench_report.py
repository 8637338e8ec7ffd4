"""Figures and plots of ``facepay bench`` runs (DESIGN.md §5 keys)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path
from typing import Any


def read_outputs(
    outs: list[tuple[bytes, bytes]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(session records, terminal errors, end-of-run lines) from the terminal processes'
    (stdout, stderr); a process that printed nothing but an error counts as one error."""
    records: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    ends: list[dict[str, Any]] = []
    for out, err in outs:
        for line in out.decode().splitlines():
            rec = json.loads(line)
            if "order_id" in rec or "gate" in rec:
                records.append(rec)
            elif "terminal_error" in rec:
                errors.append(rec)
            else:
                ends.append(rec)
        if not out and err:
            errors.append({"stderr": err.decode()[-400:]})
    return records, errors, ends


def add_session_counts(
    result: dict[str, Any],
    records: list[dict[str, Any]],
    signal: list[dict[str, Any]],
    errors: list[dict[str, Any]],
    ws_terminals: int,
) -> None:
    """``ws_sessions`` (WebSocket-only terminals' checkouts) and ``error_rate`` into a
    checkout run's ``result``."""
    if ws_terminals:
        bad = sum(1 for r in signal if r["outcome"] != "cancelled")
        result["ws_terminals"] = ws_terminals
        result["ws_sessions"] = {"started": len(signal), "ok": len(signal) - bad, "errors": bad}
    # A terminal that died counts as one failure too: its sessions never started.
    all_sessions = len(records) + len(signal) + len(errors)
    failed = result["sessions"]["lost"] + result.get("ws_sessions", {}).get("errors", 0)
    failed += len(errors)
    result["error_rate"] = round(failed / all_sessions, 4) if all_sessions else None


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank), rounded to 0.1."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 1)


def pauses_video(args: argparse.Namespace) -> bool:
    """Whether the bench's terminals pause their video while no checkout looks (the default;
    not with ``--continuous-video``, nor with ``--live-encode``, whose track cannot pause)."""
    return not args.continuous_video and not args.live_encode


def summary(
    n: int,
    args: argparse.Namespace,
    records: list[dict[str, Any]],
    errors: list[dict[str, Any]],
    frames_sent: int,
    before: dict[str, float],
    after: dict[str, float],
    cpu0: float | None,
    cpu1: float | None,
    peak_mb: float,
) -> dict[str, Any]:
    """One run's JSON from its session records and the server's before/after counters."""
    confirms = [float(r["confirm_ms"]) for r in records if "confirm_ms" in r]
    outcomes: dict[str, int] = {}
    for r in records:
        key = r["outcome"] if r["outcome"] != "declined" else f"declined:{r.get('reason')}"
        outcomes[key] = outcomes.get(key, 0) + 1
    decided = sum(1 for r in records if r["outcome"] in ("approved", "declined"))
    return {
        "terminals": n,
        "fps": args.fps,
        "duration_s": args.duration,
        "gap_s": args.gap,
        "video_between_shoppers": "paused" if pauses_video(args) else "streaming",
        "confirm_ms": latency(confirms),
        "sessions": {
            "started": len(records),
            "decided": decided,
            "lost": len(records) - decided,
            "approved": outcomes.get("approved", 0),
        },
        "outcomes": outcomes,
        "decisions_per_s": round(decided / args.duration, 2),
        **server_figures(decided, frames_sent, before, after, cpu0, cpu1),
        "peak_rss_mb": round(peak_mb, 1),
        "terminal_errors": errors,
        "_records": records,
    }


def latency(values: list[float]) -> dict[str, float | None]:
    """``{"p50", "p95", "max"}`` of milliseconds (None without values)."""
    return {
        "p50": percentile(values, 0.5),
        "p95": percentile(values, 0.95),
        "max": round(max(values), 1) if values else None,
    }


def server_figures(
    decided: int,
    frames_sent: int,
    before: dict[str, float],
    after: dict[str, float],
    cpu0: float | None,
    cpu1: float | None,
) -> dict[str, Any]:
    """The server's side of a run, from its counters before and after: frames, CPU and
    model time per decision, their ratio and where the rest went (checkout and gate alike).

    CPU is psutil's on the server process where this command started it (``cpu0``/``cpu1``),
    else the server's own ``process_cpu_seconds_total``.
    """
    cpu_s = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None
    if cpu_s is None:
        cpu_s = after["cpu_s"] - before["cpu_s"]
    model_s = after["model_s"] - before["model_s"]
    argon2_s = after.get("argon2_s", 0.0) - before.get("argon2_s", 0.0)
    cpu_ms = cpu_s * 1000 / decided if decided else None
    model_ms = model_s * 1000 / decided if decided else None
    threads = _thread_cpu(before, after)
    decoders_s = threads.get("video_decoders")
    return {
        "frames": {
            "sent": frames_sent,
            "received": int(after["received"] - before["received"]),
            "processed": int(after["processed"] - before["processed"]),
            "dropped": int(after["dropped"] - before["dropped"]),
            "undecoded": int(after["undecoded"] - before["undecoded"]),
            "no_detector": int(after["no_detector"] - before["no_detector"]),
        },
        "server_cpu_s": round(cpu_s, 2),
        "model_s": round(model_s, 2),
        "cpu_ms_per_decision": round(cpu_ms, 1) if cpu_ms is not None else None,
        "model_ms_per_decision": round(model_ms, 1) if model_ms is not None else None,
        "overhead_ratio": round(cpu_s / model_s, 3) if model_s > 0 else None,
        # The same without the passphrase check, whose cost is set by its security
        # parameters rather than by the server's efficiency (docs/performance.md).
        "overhead_ratio_without_argon2id": (
            round((cpu_s - argon2_s) / model_s, 3) if model_s > 0 else None
        ),
        # ... and without VP8 decoding too, whose cost is set by what the camera sends: the
        # reading of the ratio issue 6 left open (docs/performance.md). None when the
        # server does not report its decoder threads.
        "overhead_ratio_without_argon2id_and_decoding": (
            round((cpu_s - argon2_s - decoders_s) / model_s, 3)
            if model_s > 0 and decoders_s is not None
            else None
        ),
        # Where the rest goes: argon2id (a deliberate cost per payment) and everything else
        # (WebRTC receive and VP8 decode of every frame, pre/post-processing, the event loop).
        "cpu_breakdown_ms_per_decision": _breakdown(cpu_s, model_s, argon2_s, decided, threads),
        # The embedded Redis (a child process; not in server_cpu_s), where the bench started it.
        "redis_cpu_ms_per_decision": (
            round((after["redis_cpu_s"] - before["redis_cpu_s"]) * 1000 / decided, 1)
            if decided and "redis_cpu_s" in after and "redis_cpu_s" in before
            else None
        ),
    }


def _thread_cpu(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per thread role over the run (``facepay_thread_cpu_seconds_total``)."""
    return {
        key.removeprefix("thread:"): after[key] - before.get(key, 0.0)
        for key in after
        if key.startswith("thread:")
    }


def _breakdown(
    cpu_s: float, model_s: float, argon2_s: float, decided: int, threads: dict[str, float]
) -> Any:
    """Milliseconds per decision: model, argon2id and the rest (``other``), and the rest by
    thread where the server reports it: the workers' own pre/post-processing (their CPU less
    model and argon2id), the VP8 decoders, the event loop, and other threads with what the
    roles did not catch (threads that ended between two reads of /metrics)."""
    if not decided:
        return None
    per = 1000 / decided
    out: dict[str, Any] = {
        "model": round(model_s * per, 1),
        "argon2id": round(argon2_s * per, 1),
        "other": round((cpu_s - model_s - argon2_s) * per, 1),
    }
    if threads.get("workers", 0.0) > 0:
        workers, decoders = threads["workers"], threads.get("video_decoders", 0.0)
        loop = threads.get("event_loop", 0.0)
        out["other_by_thread"] = {
            "workers_own": round((workers - model_s - argon2_s) * per, 1),
            "video_decoders": round(decoders * per, 1),
            "event_loop": round(loop * per, 1),
            "other_threads": round((cpu_s - workers - decoders - loop) * per, 1),
        }
    return out


def plot(path: Path, runs: list[dict[str, Any]]) -> None:
    """Latency histograms (one per run) and the throughput-vs-terminals curve, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    # Checkout: time to the confirm prompt; gate: each person's decision_ms.
    key = "decision_ms" if runs and runs[0].get("mode") == "gate" else "confirm_ms"
    what = "gate decision time" if key == "decision_ms" else "time to confirm"
    for r in runs:
        values = [rec[key] for rec in r["_records"] if key in rec]
        ax1.hist(values, bins=30, alpha=0.5, label=f"{r['terminals']} terminals")
    ax1.set(xlabel=f"{what} (ms)", ylabel="decisions", title=what.capitalize())
    ax1.legend()
    xs = [r["terminals"] for r in runs]
    ax2.plot(xs, [r["decisions_per_s"] for r in runs], "o-", label="decisions/s")
    ax2.set(xlabel="concurrent terminals", ylabel="decisions per second", title="Throughput")
    ax3 = ax2.twinx()
    ax3.plot(xs, [r[key]["p95"] or 0 for r in runs], "s--", color="C1")
    ax3.set_ylabel(f"p95 {what} (ms)", color="C1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def camera_totals(lines: list[dict[str, Any]]) -> dict[str, int]:
    """All terminals' ``camera`` messages from the server (``camera_changes``: a checkout's
    cap after each answer, an idle gate's requests) and frames their cameras held back at a
    capped rate (``frames_held``), from their last lines."""
    out = {"camera_changes": 0, "frames_held": 0}
    for line in lines:
        for key in out:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                out[key] += int(line[key])
    return out
