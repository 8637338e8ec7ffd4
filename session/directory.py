"""The in-memory 1:N index of enrolled subjects, loaded from the store and kept current.

Only random subject ids and templates live here; the account behind a subject is looked up
in the store when (and only when) a search accepts it.
"""

from __future__ import annotations

from pipeline.config import MatchConfig
from pipeline.gallery import Decision, Gallery, decide
from pipeline.types import FloatArray
from session.store import Store


class Directory:
    """Gallery of enrolled subjects with the match policy applied."""

    def __init__(self, match: MatchConfig, dim: int = 128) -> None:
        self.match = match
        self.gallery = Gallery(dim=dim)

    async def load(self, store: Store) -> int:
        """Replace the index with every subject in the store; returns how many."""
        fresh = Gallery(dim=self.gallery.dim)
        count = 0
        async for subject_id, templates, last4 in store.iter_subjects():
            for template in templates:
                fresh.add(subject_id, template, tags={"phone_last4": last4})
            count += 1
        self.gallery = fresh
        return count

    def add(self, subject_id: str, templates: list[FloatArray], phone_last4: str) -> None:
        """Index a newly enrolled subject."""
        for template in templates:
            self.gallery.add(subject_id, template, tags={"phone_last4": phone_last4})

    def remove(self, subject_id: str) -> None:
        """Drop an erased subject."""
        self.gallery.remove(subject_id)

    def identify(self, probe: FloatArray, phone_last4: str | None = None) -> Decision:
        """Search and decide: match only above threshold AND ahead of the second by margin."""
        tag_filter = {"phone_last4": phone_last4} if phone_last4 else None
        matches = self.gallery.search(probe, k=self.match.top_k, tag_filter=tag_filter)
        return decide(matches, self.match.threshold, self.match.margin)
