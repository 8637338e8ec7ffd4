"""1:N search over enrolled face templates, and the match / no-match / ambiguous decision.

Templates are unit vectors kept in one contiguous float32 matrix, so a search is a single
matrix-vector product (about 100k templates of 128 floats score in a few milliseconds).
A subject may hold several templates; its score is the best cosine over them, because
enrolment photos differ in pose and lighting and the closest one is what matters.

Subjects can carry string tags (e.g. ``{"phone_last4": "1234"}``); ``search`` can be limited
to subjects whose tags match, which shrinks the candidate set and with it the chance of a
look-alike scoring close to the true subject.

Big galleries: below ``MatchConfig.exact_max_templates`` every search is exact. Above it,
once ``rebuild_index`` has built one, a faiss IVF index (``pipeline.ann``) proposes a pool of
candidate templates which are re-scored exactly from the float32 rows here, so the scores
handed to ``decide`` are always exact cosines; the approximation can only miss a template.
Tag-narrowed searches stay exact (the subset is tiny). Every template has a permanent id;
the index is keyed by it, and an erased template's id maps to no row, so it can never be
returned even if the index still held it. All methods are thread-safe (one lock); the
expensive part of ``rebuild_index`` runs outside it while searches use the previous index
or exact search.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from pipeline.ann import TRAIN_POINTS_PER_LIST, IvfIndex, lists_for
from pipeline.config import MatchConfig
from pipeline.decision import Decision, DecisionStatus, Match, decide
from pipeline.ranking import resized, top_subjects, unit_rows
from pipeline.tags import SubjectTags
from pipeline.types import FloatArray

__all__ = ["Decision", "DecisionStatus", "Gallery", "Match", "Searched", "decide"]

log = logging.getLogger(__name__)

Candidates = Callable[[str], bool] | Collection[str]

_INITIAL_CAPACITY = 256
# Rows copied per lock hold while filling a new index: ~6 MB, a millisecond or two of copying,
# so adds and searches interleave with a rebuild instead of waiting for all of it.
_BUILD_CHUNK = 12_288


class Searched(NamedTuple):
    """A search's result and how it was found: exact, through the index, or deeper."""

    matches: list[Match]
    via: Literal["exact", "index", "deep"]


class Gallery:
    """Thread-safe template store: exact top-k search, or ANN + exact re-rank when big."""

    def __init__(self, dim: int = 128, config: MatchConfig | None = None) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.config = config or MatchConfig()
        self._lock = threading.RLock()
        self._vectors = np.zeros((_INITIAL_CAPACITY, dim), dtype=np.float32)
        # Row -> subject index; subject indices are never reused, so stale ones stay harmless.
        self._owner = np.zeros(_INITIAL_CAPACITY, dtype=np.int64)
        # Row -> permanent template id, and back (-1: erased). Rows move when a removal
        # compacts the matrix; ids never do, so the ANN index is keyed by them.
        self._tid_of_row = np.zeros(_INITIAL_CAPACITY, dtype=np.int64)
        self._row_by_tid = np.full(_INITIAL_CAPACITY, -1, dtype=np.int64)
        self._next_tid = 0
        self._count = 0
        self._index: dict[str, int] = {}
        self._ids: list[str] = []  # subject index -> subject id
        self._tids_of: dict[int, list[int]] = {}  # subject index -> its template ids
        self._tags = SubjectTags()
        self._ann: IvfIndex | None = None
        self._ann_built_at = 0  # templates when the current index was trained
        self._building = False
        self.deep_searches = 0  # index searches made with the deeper parameters

    def __len__(self) -> int:
        """Number of templates (not subjects)."""
        return self._count

    def __contains__(self, subject_id: object) -> bool:
        return subject_id in self._index

    def subjects(self) -> list[str]:
        """Enrolled subject ids, in enrolment order."""
        with self._lock:
            return list(self._index)

    def tags(self, subject_id: str) -> dict[str, str]:
        """A copy of the subject's tags (empty for an unknown subject)."""
        with self._lock:
            return self._tags.get(subject_id)

    def add(
        self, subject_id: str, template: FloatArray, tags: Mapping[str, str] | None = None
    ) -> None:
        """Store one template for ``subject_id`` (re-normalised to unit length).

        A subject may hold several templates. ``tags`` are merged into the subject's tags,
        a later value replacing an earlier one for the same key.
        """
        self.add_many(subject_id, [template], tags)

    def add_many(
        self,
        subject_id: str,
        templates: Sequence[FloatArray] | FloatArray,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Store several templates for one subject at once (all checked before any is kept).

        Visible to the next search immediately, in the ANN index too when there is one.
        """
        if not isinstance(subject_id, str) or not subject_id:
            raise ValueError("subject_id must be a non-empty string")
        vecs = unit_rows(np.asarray(templates, dtype=np.float32), self.dim, "template")
        m = len(vecs)
        with self._lock:
            while self._count + m > len(self._vectors):
                self._grow()
            if self._next_tid + m > len(self._row_by_tid):
                size = max(2 * len(self._row_by_tid), self._next_tid + m)
                self._row_by_tid = resized(self._row_by_tid, size, fill=-1)
            if subject_id not in self._index:
                self._index[subject_id] = len(self._ids)
                self._ids.append(subject_id)
                self._tids_of[self._index[subject_id]] = []
            idx = self._index[subject_id]
            rows = np.arange(self._count, self._count + m)
            tids = np.arange(self._next_tid, self._next_tid + m, dtype=np.int64)
            self._vectors[rows] = vecs
            self._owner[rows] = idx
            self._tid_of_row[rows] = tids
            self._row_by_tid[tids] = rows
            self._tids_of[idx].extend(tids.tolist())
            self._count += m
            self._next_tid += m
            self._tags.merge(subject_id, tags or {})
            if self._ann is not None:
                self._ann.add(vecs, tids)

    def remove(self, subject_id: str) -> int:
        """Forget a subject and all its templates; returns how many templates were removed.

        From the moment this returns no search (exact or ANN) can return the subject.
        """
        with self._lock:
            idx = self._index.pop(subject_id, None)
            if idx is None:
                return 0
            self._tags.drop(subject_id)
            tids = np.asarray(self._tids_of.pop(idx), dtype=np.int64)
            gone = self._row_by_tid[tids]
            n = self._count
            kept = n - len(gone)
            # Fill the holes below the new end with the live rows above it: the matrix stays
            # dense (exact search never skips tombstones) and only the removed rows' worth
            # is copied.
            holes = np.sort(gone[gone < kept])
            tail = np.arange(kept, n)
            fillers = tail[~np.isin(tail, gone)]
            self._vectors[holes] = self._vectors[fillers]
            self._owner[holes] = self._owner[fillers]
            self._tid_of_row[holes] = self._tid_of_row[fillers]
            self._row_by_tid[self._tid_of_row[holes]] = holes
            self._row_by_tid[tids] = -1  # the tombstone the ANN re-rank checks
            # Past the new end lie removed templates and copies of rows just moved down: zero
            # them, or an erased subject's decrypted templates stay until an add overwrites them.
            self._vectors[kept:n], self._owner[kept:n], self._tid_of_row[kept:n] = 0, 0, 0
            self._count = kept
            if self._ann is not None:
                self._ann.remove(tids)
            return len(tids)

    def search(
        self,
        probe: FloatArray,
        k: int = 5,
        candidates: Candidates | None = None,
        tag_filter: Mapping[str, str] | None = None,
        exact: bool = False,
        deep: bool = False,
    ) -> list[Match]:
        """Top-``k`` subjects by best cosine to ``probe``, highest first.

        ``candidates`` (a predicate on subject ids, or a collection of them) and
        ``tag_filter`` (every key must equal the value) both narrow the search, which is then
        exact over the few matching subjects. Otherwise a gallery of at least
        ``exact_max_templates`` with a built index is searched approximately (re-ranked
        exactly), repeated deeper (``ann_recheck_nprobe`` lists, ``ann_recheck_pool``
        candidates) when the best score is weak (``_weak``); ``deep=True`` searches deeper
        at once, and ``exact=True`` forces exact search.
        """
        return self.search_via(probe, k, candidates, tag_filter, exact, deep).matches

    def search_via(
        self,
        probe: FloatArray,
        k: int = 5,
        candidates: Candidates | None = None,
        tag_filter: Mapping[str, str] | None = None,
        exact: bool = False,
        deep: bool = False,
    ) -> Searched:
        """``search``, also saying how it searched: "exact", "index" or "deep"."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        vec = unit_rows(np.asarray(probe, dtype=np.float32)[None], self.dim, "probe")[0]
        cfg = self.config
        with self._lock:
            n = self._count
            rows = self._narrowed_rows(candidates, tag_filter)
            ann = None if exact or n < cfg.exact_max_templates else self._ann
            if rows is None and ann is not None:
                if not deep:
                    found = self._ann_matches(ann, vec, k, cfg.ann_pool, cfg.ann_nprobe)
                    if not self._weak(found):
                        return Searched(found, "index")
                self.deep_searches += 1
                pool, nprobe = cfg.ann_recheck_pool, cfg.ann_recheck_nprobe
                return Searched(self._ann_matches(ann, vec, k, pool, nprobe), "deep")
            scores = (self._vectors[:n] if rows is None else self._vectors[rows]) @ vec
            owners = self._owner[:n] if rows is None else self._owner[rows]
            if scores.size == 0:
                return Searched([], "exact")
            return Searched(self._top_subjects(scores, owners, k), "exact")

    # -- the ANN index -----------------------------------------------------------------

    def approximate(self) -> bool:
        """Whether an open (un-narrowed) search now goes through the ANN index."""
        with self._lock:
            return self._ann is not None and self._count >= self.config.exact_max_templates

    def index_stale(self) -> bool:
        """True when the gallery is big enough for an index and has none, or has outgrown
        (or shrunk far below) the size its centroids were trained for."""
        cfg = self.config
        with self._lock:
            n = self._count
            if self._building or n < cfg.exact_max_templates:
                return False
            if self._ann is None:
                return True
            built = self._ann_built_at
            return n > built * cfg.ann_rebuild_growth or n * cfg.ann_rebuild_growth < built

    def index_info(self) -> dict[str, object] | None:
        """Size and parameters of the current index (None when there is none)."""
        with self._lock:
            ann = self._ann
            if ann is None:
                return None
            return {
                "templates": len(ann),
                "nlist": ann.nlist,
                "codec": ann.codec,
                "nprobe": self.config.ann_nprobe,
                "pool": self.config.ann_pool,
                "trained_at": self._ann_built_at,
                "memory_bytes": ann.memory_bytes(),
            }

    def rebuild_index(self, seed: int = 0) -> bool:
        """Train a fresh IVF index on the current templates and swap it in.

        Runs for seconds to tens of seconds at 1M templates; only short steps hold the lock
        (a training sample, then chunks of rows), so searches, adds and removes go on
        meanwhile against the previous index (or exact search). Whatever changed during
        the build is reconciled under the lock before the swap. Returns False when another
        rebuild is running or the gallery is too small to train.
        """
        cfg = self.config
        rng = np.random.default_rng(seed)
        with self._lock:
            n = self._count
            nlist = lists_for(max(n, 1), cfg.ann_lists_factor)
            if self._building or n < TRAIN_POINTS_PER_LIST * nlist:
                return False
            self._building = True
            take = TRAIN_POINTS_PER_LIST * nlist
            sample = self._vectors[np.sort(rng.choice(n, size=take, replace=False))]
        try:
            index = IvfIndex.train(sample, nlist, cfg.ann_codec)
            del sample
            self._fill(index)
            log.info("gallery index rebuilt: %d templates, %d lists", len(index), nlist)
            return True
        finally:
            with self._lock:
                self._building = False

    def _fill(self, index: IvfIndex) -> None:
        """Copy every live template into ``index`` in chunks, then reconcile and swap."""
        added = np.zeros(0, dtype=np.bool_)  # by template id: already in ``index``
        start = 0
        while True:
            with self._lock:
                stop = min(start + _BUILD_CHUNK, self._count)
                if start >= stop:
                    break
                vecs = self._vectors[start:stop].copy()
                tids = self._tid_of_row[start:stop].copy()
                size = self._next_tid
            added = resized(added, size)
            # A removal may move a row from the unread tail into the read head (never the
            # other way), so nothing is read twice; what moved is caught below.
            fresh = ~added[tids]
            index.add(vecs[fresh], tids[fresh])
            added[tids] = True
            start = stop
        with self._lock:
            added = resized(added, self._next_tid)
            live = self._tid_of_row[: self._count]
            missing = live[~added[live]]
            index.add(self._vectors[self._row_by_tid[missing]], missing)
            seen = np.flatnonzero(added)
            index.remove(seen[self._row_by_tid[seen] < 0])
            self._ann = index
            self._ann_built_at = self._count

    # -- internals ---------------------------------------------------------------------

    def _top_subjects(
        self, scores: FloatArray, owners: npt.NDArray[np.int64], k: int
    ) -> list[Match]:
        return [Match(self._ids[o], score) for o, score in top_subjects(scores, owners, k)]

    def _weak(self, found: list[Match]) -> bool:
        """Whether an index search's best score is weak enough to search again, deeper:
        below ``ann_deep_below`` but not from the threshold up to ``ann_decline_below``,
        where identify declines a match whatever a deeper search finds (MatchConfig)."""
        cfg = self.config
        best = found[0].score if found else -1.0
        return best < cfg.threshold or cfg.ann_decline_below <= best < cfg.ann_deep_below

    def _ann_matches(
        self, ann: IvfIndex, vec: FloatArray, k: int, pool: int, nprobe: int
    ) -> list[Match]:
        """Top-``k`` subjects among the index's candidates, scored exactly."""
        rows = self._candidate_rows(ann, vec, max(pool, 4 * k), nprobe)
        if rows.size == 0:
            return []
        return self._top_subjects(self._vectors[rows] @ vec, self._owner[rows], k)

    def _candidate_rows(
        self, ann: IvfIndex, vec: FloatArray, pool: int, nprobe: int
    ) -> npt.NDArray[np.int64]:
        """Rows of every template of the subjects the index proposes.

        The index may find only one of a subject's templates; scoring all of them makes
        each returned subject's score its exact best cosine, as exact search would give.
        Ids erased since the index saw them map to row -1 and are dropped.
        """
        rows = self._row_by_tid[ann.search(vec, pool, nprobe)]
        owners = np.unique(self._owner[rows[rows >= 0]])
        tids = [t for o in owners.tolist() for t in self._tids_of[o]]
        return self._row_by_tid[np.asarray(tids, dtype=np.int64)]

    def _narrowed_rows(
        self, candidates: Candidates | None, tag_filter: Mapping[str, str] | None
    ) -> npt.NDArray[np.int64] | None:
        """Rows of the allowed subjects, or None when the whole gallery is searched.

        Works from the smallest tag set and each subject's own template ids, so a
        phone-digit search costs O(subset), not O(gallery).
        """
        if candidates is None and not tag_filter:
            return None
        names: set[str] | None = None
        if tag_filter:
            names = self._tags.matching(tag_filter)
        if callable(candidates):
            pool = self._index.keys() if names is None else names
            names = {s for s in pool if candidates(s)}
        elif candidates is not None:
            wanted = {s for s in candidates if s in self._index}
            names = wanted if names is None else names & wanted
        assert names is not None
        tids = [t for s in names for t in self._tids_of[self._index[s]]]
        return np.sort(self._row_by_tid[np.asarray(tids, dtype=np.int64)])

    def _grow(self) -> None:
        capacity = 2 * len(self._vectors)
        vectors = np.zeros((capacity, self.dim), dtype=np.float32)
        vectors[: self._count] = self._vectors[: self._count]
        self._vectors.fill(0.0)  # freed memory is not cleared: no stray copy of the templates
        self._vectors = vectors
        self._owner = resized(self._owner, capacity)
        self._tid_of_row = resized(self._tid_of_row, capacity)
