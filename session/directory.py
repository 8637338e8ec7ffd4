"""The in-memory 1:N index of enrolled subjects, loaded from the store and kept current.

Only random subject ids and templates live here; the account behind a subject is looked up
in the store when (and only when) a search accepts it.

Searches run in the server's search thread (``SessionServices.search_executor``) while
enrolments and ``fp:events`` add and erase subjects from the loop thread; the gallery is
thread-safe for exactly that. Once the gallery passes ``MatchConfig.exact_max_templates``
(or outgrows its index) a background thread retrains the ANN index; until it is swapped
in, searches use the old index or exact search, which is slower but never wrong
(docs/gallery.md).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from pipeline.config import MatchConfig
from pipeline.gallery import Decision, Gallery, decide
from pipeline.types import FloatArray
from session.store import Store

log = logging.getLogger(__name__)

#: How long an erased subject id is remembered, and refused by ``Directory.add``: far longer
#: than an enrolment's write and its local add can be apart.
ERASED_MEMORY_S = 600.0

#: A change made during a load: (subject id, (templates, phone_last4)) added, or None removed.
_Change = tuple[str, tuple[list[FloatArray], str] | None]


class Directory:
    """Gallery of enrolled subjects with the match policy applied."""

    def __init__(self, match: MatchConfig, dim: int = 128) -> None:
        self.match = match
        self.gallery = Gallery(dim=dim, config=match)
        self._rebuilder: threading.Thread | None = None
        self.rechecks = 0  # index matches searched again, deeper (see identify)
        self.declined = 0  # index matches declined as ambiguous, too close to the threshold
        # One journal per load in progress: the adds and removals made while the store is
        # read, replayed onto the fresh gallery just before it replaces the current one.
        self._journals: list[list[_Change]] = []
        self._loads = 0  # loads started: only the newest may swap its gallery in
        #: Held by an enrolment from its duplicate check to its ``add`` (session.enroll,
        #: session.enrollment), so that two enrolments of one face on this server cannot
        #: both pass the check. Across servers the check stays best effort.
        self.enrolling = asyncio.Lock()
        # Subjects erased lately (id -> time.monotonic()), refused by ``add``: the erasure's
        # event can overtake an enrolment's own ``add`` after its write (an erasure through
        # another server a moment later), which would put the subject back in this index.
        # Subject ids are never reused; ERASED_MEMORY_S bounds the memory.
        self._erased: dict[str, float] = {}

    async def load(self, store: Store) -> int:
        """Replace the index with every subject in the store; returns how many.

        A big gallery gets its ANN index built (in an executor thread) before it replaces
        the current one, so the first searches after a restart are already fast. The current
        gallery keeps serving meanwhile, and ``add``/``remove`` keep working on it: a
        reload at a million subjects takes a minute, and an erasure must not wait for it.
        Those changes are also replayed onto the fresh gallery before the swap, since the
        store may have been read before or after each of them; without the replay an
        erasure during the load could come back with the swap. A load overtaken by a later
        one (a reconnect during a reload whose cancel got lost) swaps nothing: its copy of
        the store is older. A subject whose stored templates are unusable is skipped.
        """
        journal: list[_Change] = []
        self._journals.append(journal)
        self._loads += 1
        number = self._loads
        try:
            fresh = Gallery(dim=self.gallery.dim, config=self.match)
            count = 0
            async for subject_id, templates, last4 in store.iter_subjects():
                try:
                    fresh.add_many(subject_id, templates, tags={"phone_last4": last4})
                except ValueError as exc:
                    log.warning("skipping subject %s: unusable templates (%s)", subject_id, exc)
                    continue
                count += 1
            if fresh.index_stale():
                await asyncio.get_running_loop().run_in_executor(None, fresh.rebuild_index)
            if number != self._loads:
                log.info("directory load overtaken by a later one; its result is dropped")
                return count
            # No await from here to the swap: nothing can slip between replay and swap.
            for subject_id, added in journal:
                if added is None:
                    fresh.remove(subject_id)
                elif subject_id not in fresh:
                    fresh.add_many(subject_id, added[0], tags={"phone_last4": added[1]})
            self.gallery = fresh
        finally:
            self._journals.remove(journal)
        self._maybe_rebuild()
        return count

    def add(self, subject_id: str, templates: list[FloatArray], phone_last4: str) -> None:
        """Index a newly enrolled subject (searchable as soon as this returns); nothing if it
        is indexed already or was erased lately."""
        if subject_id in self.gallery or subject_id in self._erased:
            return
        self.gallery.add_many(subject_id, templates, tags={"phone_last4": phone_last4})
        for journal in self._journals:
            journal.append((subject_id, (templates, phone_last4)))
        self._maybe_rebuild()

    def remove(self, subject_id: str) -> None:
        """Drop an erased subject (never returned by a search once this returns)."""
        now = time.monotonic()
        while self._erased:  # oldest first (insertion order)
            oldest, at = next(iter(self._erased.items()))
            if now - at < ERASED_MEMORY_S:
                break
            del self._erased[oldest]
        self._erased[subject_id] = now
        self.gallery.remove(subject_id)
        for journal in self._journals:
            journal.append((subject_id, None))
        self._maybe_rebuild()

    def identify(self, probe: FloatArray, phone_last4: str | None = None) -> Decision:
        """Search and decide: match only above threshold AND ahead of the second by margin.

        A match found through the index is checked against what the index can miss
        (MatchConfig, docs/gallery.md): a narrow lead is searched again deeper, and a best
        score below ``ann_decline_below`` is declined as ambiguous, since no index search
        can rule out a runner-up within the margin down there. Declining is the safe side:
        the phone digits then decide with an exact search.
        """
        cfg, gallery = self.match, self.gallery
        tag_filter = {"phone_last4": phone_last4} if phone_last4 else None
        found = gallery.search_via(probe, k=cfg.top_k, tag_filter=tag_filter)
        decision = decide(found.matches, cfg.threshold, cfg.margin)
        if decision.status != "match" or found.via == "exact":
            return decision
        lead = decision.score - decision.second_score
        if (
            found.via == "index"
            and decision.score >= cfg.ann_decline_below
            and lead < cfg.margin + cfg.ann_recheck_band
        ):
            # The index may have missed the runner-up this lead is measured against, and
            # the next one found is usually only a little lower: a narrow lead is searched
            # again, deeper, so that a miss does not turn an ambiguous search into a match.
            self.rechecks += 1
            found = gallery.search_via(probe, k=cfg.top_k, deep=True)
            decision = decide(found.matches, cfg.threshold, cfg.margin)
        unsure = decision.score < cfg.ann_decline_below and found.via != "exact"
        if decision.status == "match" and unsure:
            self.declined += 1
            reason = (
                f"index match {decision.score:.4f} below {cfg.ann_decline_below:.4f}: "
                "a runner-up within the margin could have been missed"
            )
            return Decision("ambiguous", None, decision.score, decision.second_score, reason)
        return decision

    def wait_index(self, timeout: float | None = None) -> bool:
        """Wait for a background index rebuild; True when none is running any more."""
        thread = self._rebuilder
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def _maybe_rebuild(self) -> None:
        """Start a background rebuild when the gallery needs one and none is running."""
        if self._rebuilder is not None and self._rebuilder.is_alive():
            return
        gallery = self.gallery
        if not gallery.index_stale():
            return
        log.info(
            "gallery at %d templates: rebuilding its ANN index in the background", len(gallery)
        )
        self._rebuilder = threading.Thread(
            target=gallery.rebuild_index, name="gallery-index", daemon=True
        )
        self._rebuilder.start()
