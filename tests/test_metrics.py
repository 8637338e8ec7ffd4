"""The server's Prometheus exposition: the figures `facepay bench` reads from it."""

from __future__ import annotations

import re

from stream_server.metrics import Metrics, TimedHasher


def _value(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name}{labels} missing"
    return float(match.group(1))


def test_model_and_argon2_cpu_and_process_figures_are_exposed():
    metrics = Metrics()
    metrics.model_clock.add("yunet", 0.25)
    metrics.model_clock.add("yunet", 0.25)
    hasher = TimedHasher(metrics.work_clock)
    encoded = hasher.hash("correct horse")
    assert hasher.verify(encoded, "correct horse") and not hasher.verify(encoded, "wrong")
    text = metrics.render().decode()
    assert _value(text, "facepay_model_seconds_total", '{model="yunet"}') == 0.5
    assert _value(text, "facepay_model_runs_total", '{model="yunet"}') == 2
    assert _value(text, "facepay_work_runs_total", '{work="argon2id_verify"}') == 2
    assert _value(text, "facepay_work_seconds_total", '{work="argon2id_verify"}') > 0
    assert _value(text, "process_cpu_seconds_total") > 0
    assert _value(text, "process_resident_memory_bytes") > 0
    # Nothing secret in the exposition.
    assert "correct horse" not in text and encoded not in text
