"""How long a gallery search stalls the event loop: on the loop, or in a search thread.

Builds a gallery of N random unit templates (with its ANN index when N is over
``match.exact_max_templates``), then makes 300 searches of noisy probes from an asyncio
loop, 5 ms apart, two rounds each way, while a ticker measures how late a 1 ms sleep
wakes up (the lag every terminal's packets and messages would see). Prints the lag's
p50 / p99 / max per round.

    .venv/bin/python scripts/gallery_loop_lag.py 1000000   # ~1 minute to build, 1M templates
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline.config import MatchConfig
from session.directory import Directory


def build(n: int) -> tuple[Directory, list[np.ndarray]]:
    """A directory of ``n`` random templates (one per subject) and 300 probes near them."""
    directory = Directory(MatchConfig())
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, 128)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    for i in range(n):
        directory.gallery.add(f"s{i}", vecs[i], {"phone_last4": f"{i % 10000:04d}"})
    if n > directory.match.exact_max_templates:
        directory.gallery.rebuild_index()
    noise = rng.standard_normal((300, 128)).astype(np.float32) * (0.9 / np.sqrt(128))
    return directory, list(vecs[:300] + noise)


async def one_round(directory: Directory, probes: list[np.ndarray], on_loop: bool) -> str:
    """Loop lag (ms) while the searches run on the loop or in a one-thread executor."""
    pool = ThreadPoolExecutor(max_workers=1)
    lags: list[float] = []
    done = False

    async def ticker() -> None:
        while not done:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    task = asyncio.create_task(ticker())
    loop = asyncio.get_running_loop()
    for probe in probes:
        if on_loop:
            directory.identify(probe)
        else:
            await loop.run_in_executor(pool, directory.identify, probe)
        await asyncio.sleep(0.005)
    done = True
    await task
    pool.shutdown()
    ms = np.array(lags) * 1000.0
    where = "on the loop  " if on_loop else "search thread"
    p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
    return f"{where}: loop lag p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {ms.max():.3f} ms"


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    t0 = time.perf_counter()
    directory, probes = build(n)
    print(f"{n} templates built in {time.perf_counter() - t0:.1f} s", flush=True)
    for on_loop in (True, False, True, False):
        print(asyncio.run(one_round(directory, probes, on_loop)), flush=True)


if __name__ == "__main__":
    main()
