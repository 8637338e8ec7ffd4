"""Prometheus metrics, one registry per app (no module-level globals)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from pipeline.models import ModelClock
from session.crypto import PassphraseHasher
from stream_server.thread_cpu import ThreadCpuCollector

STAGE_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
DECISION_BUCKETS = (0.1, 0.2, 0.3, 0.33, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


class _ClockCollector(Collector):
    """``{prefix}_seconds_total`` / ``{prefix}_runs_total`` per label, read from a clock."""

    def __init__(self, clock: ModelClock, prefix: str, label: str, what: str) -> None:
        self.clock, self.prefix, self.label, self.what = clock, prefix, label, what

    def collect(self) -> Iterator[CounterMetricFamily]:
        seconds = CounterMetricFamily(
            f"{self.prefix}_seconds", f"CPU time in {self.what}", labels=[self.label]
        )
        runs = CounterMetricFamily(
            f"{self.prefix}_runs", f"Calls of {self.what}", labels=[self.label]
        )
        for name, (secs, count) in sorted(self.clock.snapshot().items()):
            seconds.add_metric([name], secs)
            runs.add_metric([name], count)
        yield seconds
        yield runs


class TimedHasher(PassphraseHasher):
    """argon2id hashing that reports its CPU time (a deliberate cost of every payment)."""

    def __init__(self, clock: ModelClock) -> None:
        super().__init__()
        self._clock = clock

    def hash(self, passphrase: str) -> str:
        """See :meth:`PassphraseHasher.hash`."""
        t0 = time.thread_time()
        try:
            return super().hash(passphrase)
        finally:
            self._clock.add("argon2id_hash", time.thread_time() - t0)

    def verify(self, encoded: str, passphrase: str) -> bool:
        """See :meth:`PassphraseHasher.verify`."""
        t0 = time.thread_time()
        try:
            return super().verify(encoded, passphrase)
        finally:
            self._clock.add("argon2id_verify", time.thread_time() - t0)


class Metrics:
    """The server's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        #: Raw inference time of every model session this app builds (see ModelStore).
        self.model_clock = ModelClock()
        r.register(
            _ClockCollector(
                self.model_clock, "facepay_model", "model", "onnxruntime session.run (raw model)"
            )
        )
        #: Other deliberate CPU work per decision (argon2id), for the bench's breakdown.
        self.work_clock = ModelClock()
        r.register(_ClockCollector(self.work_clock, "facepay_work", "work", "argon2id"))
        # process_cpu_seconds_total and process_resident_memory_bytes: what `facepay bench`
        # divides by decisions when it targets a server it did not start.
        ProcessCollector(registry=r)
        #: CPU by thread role (facepay_thread_cpu_seconds_total): the bench's breakdown.
        self.thread_cpu = ThreadCpuCollector()
        r.register(self.thread_cpu)
        self.sessions = Counter("facepay_sessions", "Sessions started", ["mode"], registry=r)
        self.sessions_active = Gauge(
            "facepay_sessions_active", "Terminal connections open", registry=r
        )
        self.frames_received = Counter(
            "facepay_frames_received", "Video frames received", registry=r
        )
        self.frames_processed = Counter(
            "facepay_frames_processed", "Video frames analysed", registry=r
        )
        self.frames_dropped = Counter(
            "facepay_frames_dropped", "Frames replaced by a newer one before analysis", registry=r
        )
        self.frames_no_detector = Counter(
            "facepay_frames_no_detector",
            "Analysed frames that skipped the face detector: a gate's empty corridor, "
            "unchanged since it was last found empty (gate.idle_change)",
            registry=r,
        )
        self.frames_undecoded = Counter(
            "facepay_frames_undecoded",
            "Video frames left undecoded: no session was looking at the video",
            registry=r,
        )
        self.erasure_purge_owed = Gauge(
            "facepay_erasure_purge_owed",
            "1 while an erasure waits for a finished purge of Redis's files (checked every "
            "server.purge_retry_s)",
            registry=r,
        )
        self.audit_chain_restarts = Counter(
            "facepay_audit_chain_restarts",
            "Restart seals this server wrote: it found the audit chain's state in Redis reset "
            "or altered (facepay admin audit-verify names them)",
            registry=r,
        )
        self.stage_seconds = Histogram(
            "facepay_stage_seconds",
            "Per-stage latency",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "facepay_decisions", "Session outcomes", ["mode", "outcome", "reason"], registry=r
        )
        self.confirm_seconds = Histogram(
            "facepay_confirm_seconds",
            "Checkout: first frame to confirm prompt",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.decision_seconds = Histogram(
            "facepay_gate_decision_seconds",
            "Gate: first frame at minimum face size to decision",
            buckets=DECISION_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
