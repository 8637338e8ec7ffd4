"""Subject tags for narrowing a gallery search (e.g. ``{"phone_last4": "1234"}``).

Kept apart from the templates: a tag lookup is a set intersection over an inverted index,
so a phone-digit search costs O(matching subjects), not O(gallery). Not thread-safe on its
own: :class:`pipeline.gallery.Gallery` calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Mapping


class SubjectTags:
    """Each subject's tags, and for every (key, value) the subjects that carry it."""

    def __init__(self) -> None:
        self._of: dict[str, dict[str, str]] = {}
        self._index: dict[tuple[str, str], set[str]] = {}

    def get(self, subject_id: str) -> dict[str, str]:
        """A copy of the subject's tags (empty for an unknown subject)."""
        return dict(self._of.get(subject_id, {}))

    def merge(self, subject_id: str, tags: Mapping[str, str]) -> None:
        """Add ``tags`` to the subject's, a new value replacing the old one for its key."""
        own = self._of.setdefault(subject_id, {})
        for key, value in tags.items():
            key, value = str(key), str(value)
            old = own.get(key)
            if old is not None:
                self._unindex(subject_id, key, old)
            own[key] = value
            self._index.setdefault((key, value), set()).add(subject_id)

    def drop(self, subject_id: str) -> None:
        """Forget the subject's tags."""
        for key, value in self._of.pop(subject_id, {}).items():
            self._unindex(subject_id, key, value)

    def matching(self, tag_filter: Mapping[str, str]) -> set[str]:
        """Subjects whose tags hold every key of ``tag_filter`` with its value."""
        groups = sorted(
            (self._index.get((str(k), str(v)), set()) for k, v in tag_filter.items()), key=len
        )
        if not groups:
            return set()
        return set(groups[0]).intersection(*groups[1:])

    def _unindex(self, subject_id: str, key: str, value: str) -> None:
        members = self._index.get((key, value))
        if members is not None:
            members.discard(subject_id)
            if not members:
                del self._index[(key, value)]
