"""Alignment and embeddings on the real models: every pair in faces/ decided right."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from pipeline.align import ARCFACE_TEMPLATE, align, similarity_transform
from pipeline.gallery import Gallery, decide

IDENTITIES = {
    "obama": ["obama.jpg", "obama2.jpg", "obama3.jpg", "obama-480p.jpg"],
    "biden": ["biden.jpg", "biden2.jpg"],
    "kit_harington": ["john1.jpeg", "john2.jpeg", "johnsnow_test1.jpg"],
}
SAMPLES = [(who, f"faces/{who}/{name}") for who, names in IDENTITIES.items() for name in names]


@pytest.fixture(scope="module")
def embeddings(analyzer, photo):
    out = {}
    for _, rel in SAMPLES:
        image = photo(rel)
        (face,) = analyzer.detect(image)
        out[rel] = analyzer.embedder.embed(align(image, face))
    return out


def test_similarity_transform_recovers_a_known_similarity():
    angle, scale, shift = np.deg2rad(17), 1.7, np.array([12.0, -5.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = ARCFACE_TEMPLATE.astype(np.float64)
    dst = src @ rot.T + shift
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], rot, atol=1e-4)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-3)


def test_aligned_landmarks_land_on_the_template(analyzer, photo):
    image = photo("faces/obama/obama.jpg")
    (face,) = analyzer.detect(image)
    m = similarity_transform(face.landmarks_array(), ARCFACE_TEMPLATE)
    mapped = cv2.transform(face.landmarks_array()[None], m)[0]
    # A similarity cannot fit five points exactly; a few pixels of residual is normal.
    assert np.abs(mapped - ARCFACE_TEMPLATE).max() < 6.0
    assert align(image, face).shape == (112, 112, 3)


def test_embeddings_are_unit_length(embeddings):
    for vec in embeddings.values():
        assert vec.shape == (128,)
        assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(("a", "b"), list(itertools.combinations(SAMPLES, 2)))
def test_every_pair_is_decided_right(analyzer, embeddings, a, b):
    threshold = analyzer.config.match.threshold
    score = float(embeddings[a[1]] @ embeddings[b[1]])
    if a[0] == b[0]:
        assert score >= threshold, f"same person {a[1]} / {b[1]} scored {score:.3f}"
    else:
        assert score < threshold, f"different people {a[1]} / {b[1]} scored {score:.3f}"


def test_gallery_finds_each_person_from_another_photo(analyzer, embeddings):
    cfg = analyzer.config.match
    gallery = Gallery()
    for who, names in IDENTITIES.items():
        gallery.add(who, embeddings[f"faces/{who}/{names[0]}"])
    for who, rel in SAMPLES:
        if rel.endswith(IDENTITIES[who][0]):
            continue
        decision = decide(gallery.search(embeddings[rel], k=3), cfg.threshold, cfg.margin)
        assert decision.status == "match" and decision.subject_id == who, (rel, decision)
    gallery.remove("obama")
    decision = decide(
        gallery.search(embeddings["faces/obama/obama2.jpg"]), cfg.threshold, cfg.margin
    )
    assert decision.status == "no_match"
