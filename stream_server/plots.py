"""Plots for ``facepay eval --plot`` (matplotlib, imported only when asked for)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.metrics import det_curve


def plot_eval(
    path: Path, sets: dict[str, tuple[Any, Any]], threshold: float, pad: dict[str, Any] | None
) -> None:
    """Score histograms, DET curves and (with PAD data) liveness histograms in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3 if pad else 2
    fig, axes = plt.subplots(1, cols, figsize=(5.5 * cols, 4.2))
    genuine, impostor = next(iter(sets.values()))
    ax = axes[0]
    bins = np.linspace(-0.5, 1.0, 76)
    ax.hist(impostor, bins=bins, density=True, alpha=0.6, label=f"impostor ({len(impostor)})")
    ax.hist(genuine, bins=bins, density=True, alpha=0.6, label=f"genuine ({len(genuine)})")
    ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.2f}")
    ax.set(title="Cosine scores", xlabel="cosine similarity", ylabel="density")
    ax.legend(fontsize=8)
    ax = axes[1]
    for name, (g, i) in sets.items():
        if len(g) and len(i):
            _, far, frr = det_curve(np.asarray(g, np.float64), np.asarray(i, np.float64))
            # Zero rates cannot sit on log axes: floor them at half a sample's share.
            floor_far, floor_frr = 0.5 / max(len(i), 1), 0.5 / max(len(g), 1)
            ax.loglog(np.maximum(far, floor_far), np.maximum(frr, floor_frr), label=name)
    ax.set(title="DET curve", xlabel="FAR", ylabel="FRR")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if pad:
        ax = axes[2]
        lbins = np.linspace(0, 1, 41)
        ax.hist(pad["_spoof"], bins=lbins, alpha=0.6, label=f"attack ({len(pad['_spoof'])})")
        ax.hist(pad["_live"], bins=lbins, alpha=0.6, label=f"bona fide ({len(pad['_live'])})")
        ax.axvline(pad["liveness_threshold"], color="k", ls="--", label="liveness threshold")
        ax.set(title="Liveness p_real (single frames)", xlabel="p_real", ylabel="count")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
