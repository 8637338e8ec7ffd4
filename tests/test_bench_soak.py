"""The soak summary's Redis keys per payment (stream_server/bench_soak.py), unit level."""

from __future__ import annotations

from stream_server.bench_soak import Sampler


def test_keys_per_payment_counts_only_the_payments_after_the_baseline() -> None:
    """Two keys a payment, one payment a second. The baseline is taken after the warm-up,
    so the payments before it wrote keys that the growth never saw: dividing by every
    payment made 2 keys a payment look like 1.7, which would hide a leak of 0.3."""
    sampler = Sampler(pid=None, redis_url=None)
    for second in range(21):
        sampler.rows.append(
            {"t": 100.0 + second, "wall": 5000.0 + second, "redis_keys": 10 + 2 * second}
        )
    payments = [5000.0 + second for second in range(1, 21)]
    out = sampler.summary(payments)
    # Baseline: the first sample at or after 15 % of the run (t = 103); 17 payments after it.
    assert out["redis_keys"]["growth"] == 34
    assert out["payments_in_window"] == 17
    assert out["redis_keys"]["per_payment"] == 2.0
