"""The models' published quality survives our preprocessing (LFW View-1 train, NUAA train).

These are accuracy checks, not speed checks: a slip in alignment, colour order, crop or
normalisation shows up here as a higher EER or BPCER long before anyone notices in a demo.
Targets are the issue's: EER <= 2% and TAR@FAR 1e-3 >= 0.96 (all pairs), APCER <= 1% at
BPCER <= 10% at the configured liveness threshold (single frames).
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate import (
    all_pair_scores,
    analyse_images,
    identity_folders,
    list_images,
    parse_pairs,
    protocol_scores,
)
from pipeline.metrics import pad_rates, verification_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lfw(analyzer, data_dir):
    root = data_dir / "bench" / "lfw_devtrain"
    items = [(name, p) for name, paths in identity_folders(root) for p in paths]
    assert len(items) == 3443, "LFW View-1 train split should hold 3,443 images"
    samples = analyse_images(analyzer, items, "central", embed=True, liveness=False)
    return root, samples


def test_lfw_all_pairs(analyzer, lfw):
    _, samples = lfw
    genuine, impostor = all_pair_scores(samples.samples)
    report = verification_report(genuine, impostor, analyzer.config.match.threshold)
    assert report.genuine > 2000 and report.impostor > 5_000_000
    assert report.eer is not None and report.eer <= 0.02
    assert report.tar_at_far["1e-3"] is not None and report.tar_at_far["1e-3"] >= 0.96


def test_lfw_pairs_protocol(analyzer, lfw):
    root, samples = lfw
    pairs = parse_pairs(root / "pairsDevTrain.txt")
    assert len(pairs) == 2200
    genuine, impostor, failed = protocol_scores(
        pairs, {s.path: s.embedding for s in samples.samples}, root
    )
    report = verification_report(genuine, impostor, analyzer.config.match.threshold)
    assert failed == 0
    assert report.eer is not None and report.eer <= 0.02


def test_nuaa_single_frame_liveness(analyzer, data_dir):
    root = data_dir / "bench" / "nuaa_train"
    items = [("live", p) for p in list_images(root / "live")]
    items += [("spoof", p) for p in list_images(root / "spoof")]
    got = analyse_images(analyzer, items, "single", embed=False, liveness=True)
    live = np.array([s.p_real for s in got.usable if s.identity == "live"], np.float32)
    spoof = np.array([s.p_real for s in got.usable if s.identity == "spoof"], np.float32)
    assert live.size == 90 and spoof.size == 90
    rates = pad_rates(live, spoof, analyzer.config.liveness.threshold)
    assert rates["apcer"] is not None and rates["apcer"] <= 0.01
    assert rates["bpcer"] is not None and rates["bpcer"] <= 0.10
