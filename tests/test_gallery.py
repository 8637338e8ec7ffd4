"""Tests for 1:N template search and the match decision (pipeline.gallery)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.gallery import Decision, Gallery, Match, decide

DIM = 128


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def _near(rng: np.random.Generator, base: np.ndarray, noise: float) -> np.ndarray:
    """Unit vector near ``base``: ``noise`` is the noise norm relative to the unit base."""
    step = rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(base.size)
    vec = base + noise * step
    return (vec / np.linalg.norm(vec)).astype(np.float32)


def _brute_force(
    templates: np.ndarray, owners: list[str], probe: np.ndarray, k: int
) -> list[tuple[str, float]]:
    best: dict[str, float] = {}
    for vec, owner in zip(templates, owners, strict=True):
        score = float(np.dot(vec.astype(np.float64), probe.astype(np.float64)))
        best[owner] = max(best.get(owner, -2.0), score)
    return sorted(best.items(), key=lambda item: item[1], reverse=True)[:k]


def _assert_same(got: list[Match], want: list[tuple[str, float]]) -> None:
    assert [m.subject_id for m in got] == [s for s, _ in want]
    np.testing.assert_allclose([m.score for m in got], [v for _, v in want], atol=1e-5)


def _populated(rng: np.random.Generator, n: int = 2000, subjects: int = 700):
    templates = _unit(rng, n)
    owners = [f"s{int(i)}" for i in rng.integers(0, subjects, size=n)]
    gallery = Gallery(dim=DIM)
    for vec, owner in zip(templates, owners, strict=True):
        gallery.add(owner, vec)
    return gallery, templates, owners


def test_search_matches_brute_force_on_random_data() -> None:
    rng = np.random.default_rng(1)
    gallery, templates, owners = _populated(rng)
    assert len(gallery) == 2000
    assert set(gallery.subjects()) == set(owners)
    for _ in range(20):
        probe = _near(rng, templates[int(rng.integers(0, len(templates)))], 0.5)
        for k in (1, 5, 50):
            _assert_same(gallery.search(probe, k=k), _brute_force(templates, owners, probe, k))


def test_search_after_removals_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    gallery, templates, owners = _populated(rng)
    gone = {f"s{i}" for i in range(0, 700, 3)}
    removed = sum(gallery.remove(s) for s in gone)
    keep = [i for i, owner in enumerate(owners) if owner not in gone]
    assert removed == len(owners) - len(keep)
    assert len(gallery) == len(keep)
    assert not gone & set(gallery.subjects())
    kept_t, kept_o = templates[keep], [owners[i] for i in keep]
    for _ in range(10):
        probe = _unit(rng, 1)[0]
        _assert_same(gallery.search(probe, k=10), _brute_force(kept_t, kept_o, probe, 10))
    # Adding after compaction reuses the freed rows correctly.
    extra = _unit(rng, 50)
    for i, vec in enumerate(extra):
        gallery.add(f"new{i % 7}", vec)
    all_t = np.concatenate([kept_t, extra])
    all_o = kept_o + [f"new{i % 7}" for i in range(50)]
    probe = _near(rng, extra[3], 0.1)
    _assert_same(gallery.search(probe, k=10), _brute_force(all_t, all_o, probe, 10))
    assert gallery.search(probe, k=1)[0].subject_id == "new3"


def test_several_templates_per_subject_aggregate_by_max() -> None:
    rng = np.random.default_rng(3)
    probe = _unit(rng, 1)[0]
    gallery = Gallery(dim=DIM)
    far = _unit(rng, 5)
    close = _near(rng, probe, 0.3)
    for vec in far:
        gallery.add("alice", vec)
    gallery.add("alice", close)
    gallery.add("bob", _near(rng, probe, 0.6))
    matches = gallery.search(probe, k=5)
    assert [m.subject_id for m in matches] == ["alice", "bob"]  # one entry per subject
    assert matches[0].score == pytest.approx(float(np.dot(close, probe)), abs=1e-6)
    assert gallery.remove("alice") == 6
    assert gallery.remove("alice") == 0
    assert [m.subject_id for m in gallery.search(probe)] == ["bob"]


def test_single_subject_with_many_templates_still_returns_k_subjects() -> None:
    # The top rows all belong to one subject: the search must widen past them.
    rng = np.random.default_rng(4)
    probe = _unit(rng, 1)[0]
    gallery = Gallery(dim=DIM)
    for _ in range(100):
        gallery.add("crowd", _near(rng, probe, 0.2))
    others = _unit(rng, 3)
    for i, vec in enumerate(others):
        gallery.add(f"other{i}", vec)
    matches = gallery.search(probe, k=3)
    assert len(matches) == 3
    assert matches[0].subject_id == "crowd"
    assert {m.subject_id for m in matches[1:]} < {f"other{i}" for i in range(3)}
    assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)


def test_templates_are_renormalised() -> None:
    rng = np.random.default_rng(5)
    vec = _unit(rng, 1)[0]
    gallery = Gallery(dim=DIM)
    gallery.add("a", vec * 7.5)
    assert gallery.search(vec * 0.01, k=1)[0].score == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(DIM - 1, dtype=np.float32),
        np.ones((2, DIM), dtype=np.float32),
        np.full(DIM, np.nan, dtype=np.float32),
        np.concatenate([np.ones(DIM - 1), [np.inf]]).astype(np.float32),
        np.zeros(DIM, dtype=np.float32),
    ],
    ids=["short", "matrix", "nan", "inf", "zero"],
)
def test_bad_templates_and_probes_raise(bad: np.ndarray) -> None:
    gallery = Gallery(dim=DIM)
    with pytest.raises(ValueError):
        gallery.add("a", bad)
    assert len(gallery) == 0 and gallery.subjects() == []
    gallery.add("a", np.ones(DIM, dtype=np.float32))
    with pytest.raises(ValueError):
        gallery.search(bad)


def test_bad_arguments_raise() -> None:
    gallery = Gallery(dim=4)
    with pytest.raises(ValueError):
        gallery.add("", np.ones(4, dtype=np.float32))
    with pytest.raises(ValueError):
        gallery.search(np.ones(4, dtype=np.float32), k=0)
    with pytest.raises(ValueError):
        Gallery(dim=0)
    with pytest.raises(ValueError):
        decide([], threshold=float("nan"), margin=0.1)
    with pytest.raises(ValueError):
        decide([], threshold=0.5, margin=-0.1)
    with pytest.raises(ValueError):  # NaN passes no comparison, so it would read as a match
        decide([Match("a", float("nan"))], threshold=0.45, margin=0.08)


def test_empty_gallery_gives_no_match() -> None:
    gallery = Gallery(dim=DIM)
    probe = np.ones(DIM, dtype=np.float32)
    assert gallery.search(probe) == []
    decision = decide(gallery.search(probe), threshold=0.4, margin=0.05)
    assert decision.status == "no_match"
    assert decision.subject_id is None


def test_candidates_restrict_search() -> None:
    rng = np.random.default_rng(6)
    gallery, templates, owners = _populated(rng, n=500, subjects=100)
    probe = _unit(rng, 1)[0]
    allowed = {f"s{i}" for i in range(0, 100, 5)} | {"unknown"}
    by_set = gallery.search(probe, k=100, candidates=allowed)
    by_fn = gallery.search(probe, k=100, candidates=lambda s: s in allowed)
    keep = [i for i, owner in enumerate(owners) if owner in allowed]
    want = _brute_force(templates[keep], [owners[i] for i in keep], probe, 100)
    _assert_same(by_set, want)
    _assert_same(by_fn, want)
    assert gallery.search(probe, candidates=[]) == []


def test_decide_statuses() -> None:
    assert decide([Match("a", 0.9), Match("b", 0.3)], 0.5, 0.1).status == "match"
    assert decide([Match("a", 0.9), Match("b", 0.3)], 0.5, 0.1).subject_id == "a"
    ambiguous = decide([Match("a", 0.9), Match("b", 0.85)], 0.5, 0.1)
    assert (ambiguous.status, ambiguous.subject_id) == ("ambiguous", None)
    assert ambiguous.second_score == 0.85
    low = decide([Match("a", 0.4), Match("b", 0.1)], 0.5, 0.1)
    assert (low.status, low.subject_id, low.score) == ("no_match", None, 0.4)
    # Below threshold stays no_match even when the margin also fails.
    assert decide([Match("a", 0.4), Match("b", 0.39)], 0.5, 0.1).status == "no_match"


def test_decide_boundaries_are_inclusive() -> None:
    assert decide([Match("a", 0.5), Match("b", 0.1)], 0.5, 0.1).status == "match"
    assert decide([Match("a", 0.4999), Match("b", 0.1)], 0.5, 0.1).status == "no_match"
    # 0.7 - 0.6 is 0.09999999999999998 in binary; a margin of exactly 0.1 still passes.
    exact = decide([Match("a", 0.7), Match("b", 0.6)], 0.5, 0.1)
    assert exact.status == "match"
    assert decide([Match("a", 0.7), Match("b", 0.6001)], 0.5, 0.1).status == "ambiguous"


def test_decide_second_score_is_a_different_subject() -> None:
    only = decide([Match("a", 0.8)], 0.5, 0.1)
    assert only == Decision("match", "a", 0.8, -1.0, only.reason)
    # Duplicate entries for the best subject are not its competitor; order is irrelevant.
    dup = decide([Match("b", 0.6), Match("a", 0.8), Match("a", 0.79)], 0.5, 0.1)
    assert (dup.status, dup.subject_id, dup.second_score) == ("match", "a", 0.6)


def test_tag_filter_turns_ambiguous_into_match() -> None:
    rng = np.random.default_rng(7)
    alice = _unit(rng, 1)[0]
    twin = _near(rng, alice, 0.15)  # a look-alike close enough to break the margin
    gallery = Gallery(dim=DIM)
    gallery.add("alice", alice, tags={"phone_last4": "1234"})
    gallery.add("twin", twin, tags={"phone_last4": "9876"})
    for i, vec in enumerate(_unit(rng, 200)):
        gallery.add(f"other{i}", vec, tags={"phone_last4": f"{i:04d}"})
    probe = _near(rng, alice, 0.1)
    open_search = decide(gallery.search(probe), threshold=0.5, margin=0.1)
    assert open_search.status == "ambiguous"
    narrowed = gallery.search(probe, tag_filter={"phone_last4": "1234"})
    assert [m.subject_id for m in narrowed] == ["alice"]
    decision = decide(narrowed, threshold=0.5, margin=0.1)
    assert (decision.status, decision.subject_id) == ("match", "alice")
    assert gallery.search(probe, tag_filter={"phone_last4": "0000", "zip": "x"}) == []
    assert gallery.search(probe, tag_filter={"phone_last4": "5555"}) == []


def test_tags_merge_and_follow_removal() -> None:
    gallery = Gallery(dim=4)
    vec = np.array([1, 0, 0, 0], dtype=np.float32)
    gallery.add("a", vec, tags={"phone_last4": "1111", "country": "NL"})
    gallery.add("a", vec, tags={"phone_last4": "2222"})
    assert gallery.tags("a") == {"phone_last4": "2222", "country": "NL"}
    assert gallery.search(vec, tag_filter={"phone_last4": "1111"}) == []
    assert [m.subject_id for m in gallery.search(vec, tag_filter={"country": "NL"})] == ["a"]
    gallery.remove("a")
    gallery.add("a", vec)
    assert gallery.tags("a") == {}
    assert gallery.search(vec, tag_filter={"country": "NL"}) == []


def test_search_finds_the_subject_among_100k_templates() -> None:
    # Speed is measured by `facepay bench-gallery` (docs/gallery.md), not asserted here.
    rng = np.random.default_rng(8)
    gallery = Gallery(dim=DIM)
    templates = _unit(rng, 100_000)
    for i, vec in enumerate(templates):
        gallery.add(f"s{i // 2}", vec)
    probe = _near(rng, templates[12345], 0.3)
    matches = gallery.search(probe, k=5)
    assert matches[0].subject_id == "s6172"
    assert len({m.subject_id for m in matches}) == len(matches) == 5


def test_add_many_is_all_or_nothing() -> None:
    rng = np.random.default_rng(9)
    gallery = Gallery(dim=DIM)
    good = _unit(rng, 3)
    bad = good.copy()
    bad[2] = np.nan
    with pytest.raises(ValueError):
        gallery.add_many("a", bad, tags={"phone_last4": "1234"})
    assert len(gallery) == 0 and "a" not in gallery and gallery.tags("a") == {}
    with pytest.raises(ValueError):
        gallery.add_many("a", [])
    gallery.add_many("a", list(good * 3.0), tags={"phone_last4": "1234"})
    assert len(gallery) == 3 and gallery.tags("a") == {"phone_last4": "1234"}
    assert gallery.search(good[1], k=1)[0].score == pytest.approx(1.0, abs=1e-6)
    assert gallery.remove("a") == 3 and len(gallery) == 0


def _holds(rows: np.ndarray, templates: np.ndarray) -> bool:
    """Whether any row of ``rows`` is (to float precision) one of ``templates``."""
    return bool(np.any(np.abs(rows @ templates.T - 1.0) < 1e-5))


def test_removed_templates_do_not_stay_in_memory() -> None:
    """Erasure drops a subject's decrypted templates from memory, not only from the search:
    the rows a removal frees, past the new end, are zeroed with their bookkeeping."""
    rng = np.random.default_rng(10)
    first, second, third = _unit(rng, 3), _unit(rng, 2), _unit(rng, 2)
    gallery = Gallery(dim=DIM)
    gallery.add_many("a", first)
    gallery.add_many("b", second)
    assert gallery.remove("b") == 2  # the last subject: nothing moves
    end = len(gallery)
    assert end == 3 and not _holds(gallery._vectors, second)
    assert not gallery._vectors[end:].any()
    assert not gallery._owner[end:].any() and not gallery._tid_of_row[end:].any()
    # The first subject, while another remains: the other's rows move down over its own.
    gallery.add_many("c", third)
    assert gallery.remove("a") == 3
    end = len(gallery)
    assert end == 2 and not _holds(gallery._vectors, first) and not _holds(gallery._vectors, second)
    assert not gallery._vectors[end:].any()
    assert not gallery._owner[end:].any() and not gallery._tid_of_row[end:].any()
    assert [m.subject_id for m in gallery.search(third[1], k=5)] == ["c"]
    # Growing the matrix leaves no copy in the one it replaces.
    old = gallery._vectors
    gallery.add_many("d", _unit(rng, len(old)))
    assert gallery._vectors is not old and not old.any()
