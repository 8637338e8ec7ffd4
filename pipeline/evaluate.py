"""Offline evaluation over photo folders: embeddings, pair scores, liveness samples.

Used by ``facepay eval``. Each image gives at most one face: ``single`` selection skips
images with several comparable faces (a group photo is not an identity sample), ``central``
takes the face nearest the image centre (LFW and other centred benchmark sets).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.analyzer import FaceAnalyzer
from pipeline.errors import ImageError
from pipeline.image import load_image
from pipeline.types import Face, FloatArray

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
Selection = Literal["single", "central"]
Progress = Callable[[int, int], None]


@dataclass
class Sample:
    """One image's outcome: its identity, and its embedding or why there is none."""

    identity: str
    path: Path
    embedding: FloatArray | None = None
    p_real: float | None = None
    skipped: str | None = None


@dataclass
class SampleSet:
    """Samples of a folder, with the reasons some images gave nothing."""

    samples: list[Sample] = field(default_factory=list)

    @property
    def usable(self) -> list[Sample]:
        """Samples that produced a face."""
        return [s for s in self.samples if s.skipped is None]

    def skipped_counts(self) -> dict[str, int]:
        """Reason -> number of images skipped for it."""
        counts: dict[str, int] = {}
        for s in self.samples:
            if s.skipped:
                counts[s.skipped] = counts.get(s.skipped, 0) + 1
        return counts


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def identity_folders(root: Path) -> list[tuple[str, list[Path]]]:
    """(identity, images) for each sub-folder of ``root`` that holds images."""
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        images = list_images(sub)
        if images:
            out.append((sub.name, images))
    return out


def select_face(faces: list[Face], shape: tuple[int, ...], how: Selection) -> Face | str:
    """The face an evaluation image stands for, or the reason it has none."""
    if not faces:
        return "no_face"
    if how == "central":
        cy, cx = shape[0] / 2, shape[1] / 2
        return min(faces, key=lambda f: (f.box.center[0] - cx) ** 2 + (f.box.center[1] - cy) ** 2)
    ordered = sorted(faces, key=lambda f: f.box.area, reverse=True)
    # A second face at least half the size of the first makes the sample ambiguous.
    if len(ordered) > 1 and ordered[1].box.area >= 0.5 * ordered[0].box.area:
        return "several_faces"
    return ordered[0]


def analyse_images(
    analyzer: FaceAnalyzer,
    items: Iterable[tuple[str, Path]],
    how: Selection,
    *,
    embed: bool,
    liveness: bool,
    progress: Progress | None = None,
) -> SampleSet:
    """Detect, select and analyse one face per image (no quality gate: we measure models)."""
    todo = list(items)
    result = SampleSet()
    for n, (identity, path) in enumerate(todo, start=1):
        sample = Sample(identity, path)
        try:
            image = load_image(path)
            chosen = select_face(analyzer.detect(image), image.shape, how)
            if isinstance(chosen, str):
                sample.skipped = chosen
            else:
                res = analyzer.analyze_face(
                    image, chosen, embed=embed, liveness=liveness, require_quality=False
                )
                sample.embedding, sample.p_real = res.embedding, res.p_real
        except ImageError:
            sample.skipped = "bad_image"
        result.samples.append(sample)
        if progress:
            progress(n, len(todo))
    return result


def all_pair_scores(samples: list[Sample]) -> tuple[FloatArray, FloatArray]:
    """Cosine scores of every same-identity and every different-identity pair."""
    usable = [s for s in samples if s.embedding is not None]
    if len(usable) < 2:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    matrix = np.stack([s.embedding for s in usable if s.embedding is not None])
    labels = np.array([s.identity for s in usable])
    scores = matrix @ matrix.T
    upper = np.triu_indices(len(usable), k=1)
    same = labels[upper[0]] == labels[upper[1]]
    flat = scores[upper]
    return flat[same].astype(np.float32), flat[~same].astype(np.float32)


def parse_pairs(path: Path) -> list[tuple[str, int, str, int]]:
    """LFW pairs file: ``name n1 n2`` (match) or ``name1 n1 name2 n2`` (mismatch) per line.

    A first line holding only numbers (the count header) is skipped.
    """
    pairs = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts or (line_no == 1 and all(p.isdigit() for p in parts)):
            continue
        if len(parts) == 3:
            pairs.append((parts[0], int(parts[1]), parts[0], int(parts[2])))
        elif len(parts) == 4:
            pairs.append((parts[0], int(parts[1]), parts[2], int(parts[3])))
        else:
            raise ValueError(f"{path}:{line_no}: expected 3 or 4 fields, got {len(parts)}")
    return pairs


def lfw_image(root: Path, name: str, number: int) -> Path:
    """Path of an LFW image: ``root/name/name_0001.jpg``."""
    return root / name / f"{name}_{number:04d}.jpg"


def protocol_scores(
    pairs: list[tuple[str, int, str, int]], embeddings: dict[Path, FloatArray | None], root: Path
) -> tuple[FloatArray, FloatArray, int]:
    """Genuine and impostor scores of a pairs protocol; a pair with no face scores -1.

    Failures to acquire are kept (as the lowest possible score) rather than dropped, so they
    count against the system as the protocol intends. Returns also the number of such pairs.
    """
    genuine: list[float] = []
    impostor: list[float] = []
    failed = 0
    for a_name, a_n, b_name, b_n in pairs:
        a = embeddings.get(lfw_image(root, a_name, a_n))
        b = embeddings.get(lfw_image(root, b_name, b_n))
        if a is None or b is None:
            score = -1.0
            failed += 1
        else:
            score = float(a @ b)
        (genuine if a_name == b_name else impostor).append(score)
    return np.array(genuine, np.float32), np.array(impostor, np.float32), failed


def pair_images(pairs: list[tuple[str, int, str, int]], root: Path) -> list[tuple[str, Path]]:
    """Distinct (identity, image) items a pairs protocol needs."""
    seen = dict.fromkeys(
        itertools.chain.from_iterable(
            ((a, lfw_image(root, a, an)), (b, lfw_image(root, b, bn))) for a, an, b, bn in pairs
        )
    )
    return list(seen)
