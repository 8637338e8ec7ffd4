"""The owed-purge pass on its own (the real mechanism runs on real Redis in test_store.py and
test_admin.py); here a stand-in store shows what the gauge says after each kind of pass."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from stream_server.purge_retry import retry_owed_purge


class _Store:
    """Owes a purge until ``finish_after`` purges have run."""

    def __init__(self, owed: bool, finish_after: int) -> None:
        self.owed = owed
        self.finish_after = finish_after
        self.purges = 0

    async def purge_owed(self) -> bool:
        return self.owed

    async def purge_history(self, *, exclusive: bool = False) -> tuple[str, ...]:
        assert exclusive  # the retry never runs beside another server's
        self.purges += 1
        if self.purges >= self.finish_after:
            self.owed = False
            return ("aof_rewrite", "slowlog")
        return ("slowlog",)  # the rewrite was still busy


def _gauge() -> tuple[Gauge, CollectorRegistry]:
    registry = CollectorRegistry()
    return Gauge("owed", "test", registry=registry), registry


async def test_nothing_owed_runs_no_purge_and_clears_the_gauge() -> None:
    store, (owed, registry) = _Store(owed=False, finish_after=1), _gauge()
    owed.set(1)
    assert await retry_owed_purge(store, owed) is None  # type: ignore[arg-type]
    assert store.purges == 0 and registry.get_sample_value("owed") == 0


async def test_the_gauge_stays_up_until_a_purge_finishes() -> None:
    store, (owed, registry) = _Store(owed=True, finish_after=2), _gauge()
    assert await retry_owed_purge(store, owed) == ("slowlog",)  # type: ignore[arg-type]
    assert registry.get_sample_value("owed") == 1  # still owed: an operator can alert on it
    assert await retry_owed_purge(store, owed) == ("aof_rewrite", "slowlog")  # type: ignore[arg-type]
    assert registry.get_sample_value("owed") == 0 and store.purges == 2
