"""Multi-face tracker: gives each face a stable id across the frames of one stream.

Association is greedy on an affinity matrix (a few faces per frame, so an optimal
assignment buys nothing measurable). A detection may join a track when

* its box overlaps the track's constant-velocity prediction (IoU >= ``iou_threshold``), or
* its centre lies within ``distance_gate`` face sizes of the prediction and the two boxes are
  of similar size (fast motion at a low frame rate leaves no overlap), or
* both carry embeddings whose cosine is at least ``relink_threshold``: this re-links a face
  to its track after the detector lost it for a while and it reappeared elsewhere.

When both sides carry embeddings, a cosine below ``embedding_threshold`` vetoes the pair
whatever the geometry says, so two people whose paths cross keep their own ids.

A track ends after ``max_missed`` consecutive updates without a match or when ``max_age_s``
seconds have passed since it was last seen; ended ids are collected for ``pop_ended``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from pipeline.types import Box, Face, FloatArray

MatchKind = Literal["new", "iou", "distance", "embedding"]
_Vec = npt.NDArray[np.float64]

# Extrapolating further than this turns a short occlusion into a box flying off screen;
# past it the predicted box stays where the velocity had carried it.
_MAX_EXTRAPOLATE_S = 0.5
# The centre-distance fallback links boxes of similar size only: a face does not grow by
# more than this factor between two updates, but a different person nearer the camera can.
_MAX_SIZE_RATIO = 1.6
# Share of the newest velocity measurement in the smoothed estimate; detector boxes jitter
# by a few pixels, which divided by a 33 ms frame interval would swing the velocity wildly.
_VELOCITY_GAIN = 0.5
# A proximity-only link counts half as much as overlap, so an overlapping detection wins.
_PROXIMITY_WEIGHT = 0.5


@dataclass(frozen=True, slots=True)
class TrackUpdate:
    """One detection assigned to a confirmed track in one ``Tracker.update`` call.

    ``is_new`` is true the first time a track is reported; ``age_s`` is the time since the
    track's first detection; ``hits`` counts its matched detections so far. ``embedding`` is
    the track's running mean embedding (unit length), or None when it has never had one.
    """

    track_id: int
    face: Face
    is_new: bool
    age_s: float
    hits: int
    matched_by: MatchKind
    embedding: FloatArray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class TrackState:
    """Snapshot of a live, confirmed track: last observed box and bookkeeping."""

    track_id: int
    box: Box
    first_seen: float
    last_seen: float
    hits: int
    missed: int
    embedding: FloatArray | None = field(default=None, compare=False, repr=False)


class _Track:
    """Mutable per-track state; never leaves this module (callers get snapshots)."""

    __slots__ = (
        "box",
        "emb_mean",
        "emb_sum",
        "face",
        "first_seen",
        "hits",
        "last_seen",
        "missed",
        "track_id",
        "velocity",
    )

    def __init__(self, face: Face, t: float, embedding: FloatArray | None) -> None:
        self.track_id: int | None = None  # assigned once the track is confirmed
        self.face = face
        self.box = _box_vec(face.box)
        self.velocity: _Vec | None = None  # px/s per coordinate, None until measured
        self.first_seen = t
        self.last_seen = t
        self.hits = 1
        self.missed = 0
        self.emb_sum: _Vec | None = None
        self.emb_mean: FloatArray | None = None
        self._add_embedding(embedding)

    def predicted(self, t: float) -> _Vec:
        """Box at time ``t`` by constant velocity, extrapolating at most a short while."""
        if self.velocity is None:
            return self.box
        dt = min(max(t - self.last_seen, 0.0), _MAX_EXTRAPOLATE_S)
        return self.box + self.velocity * dt

    def observe(self, face: Face, t: float, embedding: FloatArray | None, kind: MatchKind) -> None:
        """Fold a matched detection into the track."""
        box = _box_vec(face.box)
        dt = t - self.last_seen
        if kind == "embedding":
            # A re-link jumps across the frame; that jump is not motion to extrapolate.
            self.velocity = None
        elif dt > 0:
            measured = (box - self.box) / dt
            self.velocity = (
                measured
                if self.velocity is None
                else _VELOCITY_GAIN * measured + (1.0 - _VELOCITY_GAIN) * self.velocity
            )
        self.face = face
        self.box = box
        self.last_seen = t
        self.hits += 1
        self.missed = 0
        self._add_embedding(embedding)

    def _add_embedding(self, embedding: FloatArray | None) -> None:
        if embedding is None:
            return
        vec = embedding.astype(np.float64)
        self.emb_sum = vec if self.emb_sum is None else self.emb_sum + vec
        norm = float(np.linalg.norm(self.emb_sum))
        # Opposite vectors can cancel; then the newest one is the best guess we have.
        mean = self.emb_sum / norm if norm > 1e-12 else vec
        self.emb_mean = mean.astype(np.float32)


class Tracker:
    """Assigns stable integer ids (1, 2, ...) to faces across the frames of one stream.

    ``min_hits`` detections are needed before a track gets an id and is reported; a track
    that misses a frame before then is dropped silently (one-frame false positives never
    surface). Not thread-safe: one tracker per stream.
    """

    def __init__(
        self,
        iou_threshold: float = 0.3,
        max_missed: int = 30,
        max_age_s: float = 1.5,
        embedding_threshold: float = 0.5,
        min_hits: int = 1,
        relink_threshold: float = 0.7,
        distance_gate: float = 1.0,
    ) -> None:
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        if max_missed < 1:
            raise ValueError(f"max_missed must be >= 1, got {max_missed}")
        if not (max_age_s > 0 and math.isfinite(max_age_s)):
            raise ValueError(f"max_age_s must be positive and finite, got {max_age_s}")
        if not -1.0 <= embedding_threshold <= 1.0:
            raise ValueError(f"embedding_threshold must be in [-1, 1], got {embedding_threshold}")
        if not embedding_threshold <= relink_threshold <= 1.0:
            raise ValueError(
                f"relink_threshold must be in [embedding_threshold, 1], got {relink_threshold}"
            )
        if min_hits < 1:
            raise ValueError(f"min_hits must be >= 1, got {min_hits}")
        if not (distance_gate >= 0 and math.isfinite(distance_gate)):
            raise ValueError(f"distance_gate must be >= 0, got {distance_gate}")
        self.iou_threshold = iou_threshold
        self.max_missed = max_missed
        self.max_age_s = max_age_s
        self.embedding_threshold = embedding_threshold
        self.relink_threshold = relink_threshold
        self.min_hits = min_hits
        self.distance_gate = distance_gate
        self._tracks: list[_Track] = []
        self._next_id = 1
        self._ended: list[int] = []
        self._last_t: float | None = None
        self._dim: int | None = None

    def update(
        self,
        faces: Sequence[Face],
        t: float,
        embeddings: Sequence[FloatArray | None] | None = None,
    ) -> list[TrackUpdate]:
        """Associate this frame's detections with tracks; one update per reported detection.

        ``t`` is the frame timestamp in seconds and must not go backwards. ``embeddings``,
        when given, holds one entry per face (None where no embedding was computed). Updates
        come in detection order and only for confirmed tracks (see ``min_hits``).
        """
        if not math.isfinite(t):
            raise ValueError(f"timestamp must be finite, got {t}")
        if self._last_t is not None and t < self._last_t:
            raise ValueError(f"timestamp went backwards: {t} < {self._last_t}")
        self._last_t = t
        if embeddings is not None and len(embeddings) != len(faces):
            raise ValueError(f"{len(embeddings)} embeddings for {len(faces)} faces")
        embs = [self._check_embedding(e) for e in embeddings or [None] * len(faces)]

        # Expire by age first, so a stale track cannot capture a newcomer's detection.
        for track in [tr for tr in self._tracks if t - tr.last_seen > self.max_age_s]:
            self._end(track)

        updates: dict[int, TrackUpdate] = {}
        pairs = self._associate(faces, embs, t)
        matched_tracks = [self._tracks[ti] for ti, _, _ in pairs]
        for track, (_, di, kind) in zip(matched_tracks, pairs, strict=True):
            track.observe(faces[di], t, embs[di], kind)
            update = self._report(track, kind, t)
            if update is not None:
                updates[di] = update

        for track in [tr for tr in self._tracks if all(tr is not m for m in matched_tracks)]:
            track.missed += 1
            if track.track_id is None or track.missed >= self.max_missed:
                self._end(track)

        matched_dets = {di for _, di, _ in pairs}
        for di, face in enumerate(faces):
            if di in matched_dets:
                continue
            track = _Track(face, t, embs[di])
            self._tracks.append(track)
            update = self._report(track, "new", t)
            if update is not None:
                updates[di] = update
        return [updates[di] for di in sorted(updates)]

    def predict(self, t: float) -> dict[int, Box]:
        """Constant-velocity boxes of the live confirmed tracks at time ``t``.

        Lets a caller run the detector on some frames only and draw boxes in between;
        it changes no state.
        """
        return {
            tr.track_id: _vec_box(tr.predicted(t)) for tr in self._tracks if tr.track_id is not None
        }

    def active_tracks(self) -> list[TrackState]:
        """Snapshots of the live confirmed tracks, by id."""
        states = [
            TrackState(
                track_id=tr.track_id,
                box=tr.face.box,
                first_seen=tr.first_seen,
                last_seen=tr.last_seen,
                hits=tr.hits,
                missed=tr.missed,
                embedding=None if tr.emb_mean is None else tr.emb_mean.copy(),
            )
            for tr in self._tracks
            if tr.track_id is not None
        ]
        return sorted(states, key=lambda s: s.track_id)

    def pop_ended(self) -> list[int]:
        """Ids of tracks that ended since the last call, in the order they ended."""
        ended, self._ended = self._ended, []
        return ended

    # -- internals ---------------------------------------------------------------------

    def _associate(
        self, faces: Sequence[Face], embs: Sequence[FloatArray | None], t: float
    ) -> list[tuple[int, int, MatchKind]]:
        """Greedy matching: (track index, detection index, how) pairs, best affinity first."""
        if not self._tracks or not faces:
            return []
        preds = np.stack([tr.predicted(t) for tr in self._tracks])
        dets = np.stack([_box_vec(f.box) for f in faces])
        iou = _iou_matrix(preds, dets)

        pred_size, det_size = _sizes(preds), _sizes(dets)
        scale = np.maximum((pred_size[:, None] + det_size[None, :]) / 2.0, 1e-9)
        dist = np.linalg.norm(_centres(preds)[:, None, :] - _centres(dets)[None, :, :], axis=2)
        ratio = np.maximum(pred_size[:, None], det_size[None, :]) / np.maximum(
            np.minimum(pred_size[:, None], det_size[None, :]), 1e-9
        )
        gate = max(self.distance_gate, 1e-9)
        proximity = np.clip(1.0 - dist / (scale * gate), 0.0, 1.0)
        proximity[ratio > _MAX_SIZE_RATIO] = 0.0

        cos = np.full(iou.shape, np.nan)
        track_embs = {
            i: tr.emb_mean for i, tr in enumerate(self._tracks) if tr.emb_mean is not None
        }
        det_embs = {j: e for j, e in enumerate(embs) if e is not None}
        if track_embs and det_embs:
            track_mat = np.stack(list(track_embs.values())).astype(np.float64)
            det_mat = np.stack(list(det_embs.values())).astype(np.float64)
            cos[np.ix_(list(track_embs), list(det_embs))] = track_mat @ det_mat.T
        has_cos = ~np.isnan(cos)
        cos_or_zero = np.where(has_cos, cos, 0.0)
        veto = has_cos & (cos_or_zero < self.embedding_threshold)
        relink = has_cos & (cos_or_zero >= self.relink_threshold)
        by_iou = iou >= self.iou_threshold
        by_dist = proximity > 0.0
        eligible = ((by_iou | by_dist) & ~veto) | relink
        affinity = np.maximum(iou, _PROXIMITY_WEIGHT * proximity) + cos_or_zero

        rows, cols = np.nonzero(eligible)
        order = np.argsort(-affinity[rows, cols], kind="stable")
        used_t: set[int] = set()
        used_d: set[int] = set()
        pairs: list[tuple[int, int, MatchKind]] = []
        for k in order:
            ti, di = int(rows[k]), int(cols[k])
            if ti in used_t or di in used_d:
                continue
            used_t.add(ti)
            used_d.add(di)
            kind: MatchKind = (
                "iou" if by_iou[ti, di] else "distance" if by_dist[ti, di] else "embedding"
            )
            pairs.append((ti, di, kind))
        return pairs

    def _report(self, track: _Track, kind: MatchKind, t: float) -> TrackUpdate | None:
        """Confirm the track if it has enough hits, and describe it; None while tentative."""
        is_new = False
        if track.track_id is None:
            if track.hits < self.min_hits:
                return None
            track.track_id = self._next_id
            self._next_id += 1
            is_new = True
        return TrackUpdate(
            track_id=track.track_id,
            face=track.face,
            is_new=is_new,
            age_s=t - track.first_seen,
            hits=track.hits,
            matched_by=kind,
            embedding=None if track.emb_mean is None else track.emb_mean.copy(),
        )

    def _end(self, track: _Track) -> None:
        self._tracks.remove(track)
        if track.track_id is not None:
            self._ended.append(track.track_id)

    def _check_embedding(self, embedding: FloatArray | None) -> FloatArray | None:
        """Validate and re-normalise one embedding (a caller's rounding must not skew cosines)."""
        if embedding is None:
            return None
        vec = np.asarray(embedding, dtype=np.float32)
        if vec.ndim != 1 or vec.size == 0:
            raise ValueError(f"embedding must be a non-empty 1-D vector, got shape {vec.shape}")
        if self._dim is None:
            self._dim = vec.size
        elif vec.size != self._dim:
            raise ValueError(f"embedding has dimension {vec.size}, tracker uses {self._dim}")
        if not np.all(np.isfinite(vec)):
            raise ValueError("embedding contains NaN or infinity")
        norm = float(np.linalg.norm(vec))
        if norm == 0.0:
            raise ValueError("embedding is the zero vector")
        return (vec / norm).astype(np.float32)


def _box_vec(box: Box) -> _Vec:
    return np.array([box.x1, box.y1, box.x2, box.y2], dtype=np.float64)


def _vec_box(vec: _Vec) -> Box:
    return Box(float(vec[0]), float(vec[1]), float(vec[2]), float(vec[3]))


def _centres(boxes: _Vec) -> _Vec:
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2.0, (boxes[:, 1] + boxes[:, 3]) / 2.0], axis=1)


def _sizes(boxes: _Vec) -> _Vec:
    """Face size as the square root of box area: robust to slightly non-square boxes."""
    w = np.clip(boxes[:, 2] - boxes[:, 0], 0.0, None)
    h = np.clip(boxes[:, 3] - boxes[:, 1], 0.0, None)
    return np.asarray(np.sqrt(w * h), dtype=np.float64)


def _iou_matrix(a: _Vec, b: _Vec) -> _Vec:
    """Pairwise IoU of (N, 4) and (M, 4) boxes, same convention as ``Box.iou``."""
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0.0, None) * np.clip(iy2 - iy1, 0.0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0.0, None) * np.clip(a[:, 3] - a[:, 1], 0.0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0.0, None) * np.clip(b[:, 3] - b[:, 1], 0.0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
