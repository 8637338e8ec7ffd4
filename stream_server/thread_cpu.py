"""Server CPU by thread role, for ``/metrics`` and ``facepay bench``'s breakdown.

``facepay_thread_cpu_seconds_total{role}``: user + system CPU of the process's threads,
grouped as ``event_loop`` (the thread that runs the app: WebRTC receive, SRTP, the jitter
buffer, WebSocket and Redis I/O), ``workers`` (the inference executor: models, argon2id and
the pipeline's own pre/post-processing), ``video_decoders`` (aiortc's VP8 decoder threads,
one per terminal) and ``other_threads``. Read from ``/proc/self/task`` at scrape time (Linux;
nothing elsewhere). A thread that ended keeps the CPU it had at the last scrape that saw it,
so each role only grows; what it used after that scrape is in the process total only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

ROLES = ("event_loop", "workers", "video_decoders", "other_threads")
#: The inference executor's thread-name prefix (stream_server.app).
WORKER_PREFIX = "facepay-work"
#: aiortc names a receiver's decoder thread after its kind.
DECODER_NAME = "video-decoder"


def thread_cpu_s(tid: int, task_dir: Path = Path("/proc/self/task")) -> float | None:
    """User + system CPU seconds of thread ``tid`` of this process; None if it is gone."""
    try:
        stat = (task_dir / str(tid) / "stat").read_text()
    except OSError:
        return None
    # "tid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the
    # last ")". utime and stime are fields 14 and 15 of the line, 11 and 12 after comm.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def role_of(thread: threading.Thread, loop_tid: int | None) -> str:
    """The role a thread's CPU is counted under."""
    if thread.native_id is not None and thread.native_id == loop_tid:
        return "event_loop"
    if thread.name.startswith(WORKER_PREFIX):
        return "workers"
    if thread.name == DECODER_NAME:
        return "video_decoders"
    return "other_threads"


class ThreadCpuCollector(Collector):
    """``facepay_thread_cpu_seconds_total{role}``; :meth:`set_loop_thread` names the loop's."""

    def __init__(self) -> None:
        self._loop_tid: int | None = None
        self._lock = threading.Lock()  # scrapes may come from two threads (tests)
        self._live: dict[int, tuple[str, float]] = {}
        self._ended = dict.fromkeys(ROLES, 0.0)

    def set_loop_thread(self, tid: int) -> None:
        """The native id of the thread that runs the event loop."""
        self._loop_tid = tid

    def totals(self) -> dict[str, float]:
        """CPU seconds per role so far."""
        seen: dict[int, tuple[str, float]] = {}
        for thread in threading.enumerate():
            tid = thread.native_id
            cpu = thread_cpu_s(tid) if tid is not None else None
            if tid is not None and cpu is not None:
                seen[tid] = (role_of(thread, self._loop_tid), cpu)
        with self._lock:
            for tid, (role, cpu) in self._live.items():
                if tid not in seen:
                    self._ended[role] += cpu
            self._live = seen
            out = dict(self._ended)
        for role, cpu in seen.values():
            out[role] += cpu
        return out

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "facepay_thread_cpu_seconds",
            "CPU seconds of the server's threads by role (event loop, inference workers, "
            "video decoders, other)",
            labels=["role"],
        )
        for role, seconds in self.totals().items():
            family.add_metric([role], seconds)
        yield family
