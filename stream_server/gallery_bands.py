"""Per-band accuracy of ``facepay bench-gallery``: recall@1, disagreements, fail-open.

A fail-open disagreement is one where identify (or the index search alone) says match and
exact search does not, or names another subject: it skips the phone-digit step. The
others (a match lost, an ambiguous search called no-match) fail closed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.decision import Decision


class BandAccuracy:
    """Accuracy per band of genuine probe-to-template cosine, and over the impostors."""

    def __init__(self, names: list[str], band_of: npt.NDArray[np.int64]) -> None:
        self.queries = len(band_of)  # genuine probes come first, then the impostors
        self.band_of = band_of.tolist()
        self.names = [*names, "impostor"]
        self.rows: dict[str, dict[str, Any]] = {
            name: {"probes": 0, "hits": 0, "exact": Counter(), "flips": Counter()}
            for name in self.names
        }
        self.open: dict[str, Counter[str]] = {n: Counter() for n in self.names}
        self.total: Counter[str] = Counter({"identify": 0, "index_only": 0})

    def add(self, q: int, want: Decision, decision: Decision, raw: Decision, hit: bool) -> None:
        """Probe ``q``: the exact decision, identify's, the index search's alone, and
        whether the index search's best subject is the exact one."""
        name = self.names[self.band_of[q]] if q < self.queries else "impostor"
        row = self.rows[name]
        row["probes"] += 1
        row["hits"] += hit
        row["exact"][want.status] += 1
        if (decision.status, decision.subject_id) != (want.status, want.subject_id):
            row["flips"][f"{want.status}->{decision.status}"] += 1
        for how, got in (("identify", decision), ("index_only", raw)):
            if got.status == "match" and (want.status, want.subject_id) != (
                "match",
                got.subject_id,
            ):
                self.open[name][how] += 1
                self.total[how] += 1

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, row in self.rows.items():
            out[name] = {
                "probes": row["probes"],
                "exact_decisions": dict(row["exact"]),
                "disagreements": dict(row["flips"]),
                "fail_open": self.open[name]["identify"],
                "fail_open_index_only": self.open[name]["index_only"],
            }
            if name != "impostor":
                out[name]["recall_at_1"] = round(row["hits"] / max(1, row["probes"]), 4)
        return out
