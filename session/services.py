"""Services and observer a session is given by the edge (injected, so tests can swap them)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from pipeline.analyzer import FaceAnalyzer
from pipeline.decision import Decision
from pipeline.types import FloatArray, ImageArray
from session.config import FacePayConfig
from session.crypto import PassphraseHasher
from session.directory import Directory
from session.ratelimit import RateLimiter
from session.store import Store

_T = TypeVar("_T")


class Observer(Protocol):
    """What a session reports to the edge (metrics); all methods must be cheap."""

    def frame_processed(self, timings_ms: dict[str, float], *, detector_ran: bool = True) -> None:
        """One frame analysed; ``detector_ran`` False when the idle check skipped detection."""

    def confirm_latency(self, seconds: float) -> None: ...

    def decision(self, mode: str, outcome: str, reason: str) -> None: ...

    def gate_decision(self, seconds: float) -> None: ...


@dataclass(frozen=True)
class SessionServices:
    """What a session needs from the server, injected."""

    config: FacePayConfig
    store: Store
    directory: Directory
    analyzer: FaceAnalyzer
    hasher: PassphraseHasher
    executor: Executor
    to_bgr: Callable[[Any], ImageArray]
    observer: Observer
    #: Budgets counted in Redis that a session spends itself (wrong phone digits per person).
    limiter: RateLimiter
    #: Where gallery searches run (``identify``, ``search``): off the event loop, and not
    #: queued behind the inference in ``executor``.
    search_executor: Executor

    async def identify(self, probe: FloatArray, phone_last4: str | None = None) -> Decision:
        """``directory.identify`` in ``search_executor``."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.search_executor, self.directory.identify, probe, phone_last4
        )

    async def search(self, fn: Callable[[Directory, Any], _T], probe: Any) -> _T:
        """``fn(directory, probe)``, a function of the gallery such as
        ``session.phone_digits.lookalikes``, in ``search_executor``."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.search_executor, fn, self.directory, probe)
