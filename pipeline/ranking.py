"""Array helpers of ``pipeline.gallery``: per-subject top-k, unit rows, growing arrays."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import numpy.typing as npt

from pipeline.types import FloatArray

_A = TypeVar("_A", bound=np.generic)


def top_subjects(
    scores: FloatArray, owners: npt.NDArray[np.int64], k: int
) -> list[tuple[int, float]]:
    """Best ``k`` distinct owners with their best score, highest first.

    Scans rows by descending score, widening as needed: a full sort of 100k scores costs
    more than the product itself, and usually the top few rows already name ``k``
    different owners, so a small head is partitioned first.
    """
    total = scores.size
    neg = -scores
    head = min(total, 4 * k)
    while True:
        part = np.argpartition(neg, head - 1)[:head] if head < total else np.arange(total)
        order = part[np.argsort(neg[part], kind="stable")]
        found: dict[int, float] = {}
        for row in order:
            owner = int(owners[row])
            if owner not in found:
                found[owner] = float(scores[row])
                if len(found) == k:
                    break
        if len(found) == k or head == total:
            break
        head = min(total, head * 4)
    return [(o, min(1.0, max(-1.0, s))) for o, s in found.items()]


def unit_rows(vecs: FloatArray, dim: int, what: str) -> FloatArray:
    """Rows of ``vecs`` as unit float32 vectors; ValueError if any row is unusable."""
    if vecs.ndim != 2 or vecs.shape[1] != dim or len(vecs) == 0:
        raise ValueError(f"{what} must have shape ({dim},), got {vecs.shape[1:]}")
    if not np.all(np.isfinite(vecs)):
        raise ValueError(f"{what} contains NaN or infinity")
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    if np.any(norms == 0.0):
        raise ValueError(f"{what} is the zero vector")
    return (vecs / norms).astype(np.float32)


def resized(array: npt.NDArray[_A], size: int, fill: int = 0) -> npt.NDArray[_A]:
    """``array`` extended to ``size`` elements with ``fill`` (returned as is when big enough)."""
    if len(array) >= size:
        return array
    grown = np.full(size, fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown
