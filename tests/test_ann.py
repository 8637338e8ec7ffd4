"""Tests for big-gallery search: the faiss IVF index behind Gallery (pipeline.ann).

Galleries of 20k synthetic templates (stream_server.cli_gallery's face model) with the exact
threshold forced down to 5k, so every open search goes through the index and its exact
re-rank. Latency is measured by ``facepay bench-gallery``, not asserted here.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from pipeline import ann
from pipeline.ann import IvfIndex, lists_for
from pipeline.config import MatchConfig
from pipeline.gallery import Gallery, decide
from session.crypto import PassphraseHasher, TemplateCipher, generate_key
from session.directory import Directory
from session.store import Store
from stream_server import cli
from stream_server.cli_gallery import SyntheticFaces

PER = 3
SUBJECTS = 6_700  # 20,100 templates
CONFIG = MatchConfig(exact_max_templates=5_000)
CONSENT = {"terminal": "t_enrol", "method": "kiosk-checkbox", "time": "2024-05-01T10:00:00Z"}


@dataclass
class World:
    faces: SyntheticFaces
    identities: np.ndarray
    templates: np.ndarray
    last4: list[str]


@pytest.fixture(scope="module")
def world() -> World:
    faces = SyntheticFaces(seed=11)
    identities = faces.identities(SUBJECTS)
    templates = faces.templates(identities, PER)
    last4 = [f"{d:04d}" for d in faces.rng.integers(0, 300, size=SUBJECTS)]  # ~22 per tag
    return World(faces, identities, templates, last4)


def _gallery(world: World, config: MatchConfig = CONFIG, build: bool = True) -> Gallery:
    gallery = Gallery(config=config)
    for i in range(SUBJECTS):
        rows = world.templates[i * PER : (i + 1) * PER]
        gallery.add_many(f"s{i}", rows, tags={"phone_last4": world.last4[i]})
    if build:
        assert gallery.index_stale()
        assert gallery.rebuild_index()
        assert not gallery.index_stale()
    return gallery


@pytest.fixture
def ann_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts searches that went through the ANN index."""
    calls: list[int] = []
    original = IvfIndex.search

    def counting(self: IvfIndex, probe: np.ndarray, pool: int, nprobe: int) -> np.ndarray:
        calls.append(pool)
        return original(self, probe, pool, nprobe)

    monkeypatch.setattr(IvfIndex, "search", counting)
    yield calls


def test_ann_decisions_equal_exact_ones(world: World, ann_calls: list[int]) -> None:
    gallery = _gallery(world)
    info = gallery.index_info()
    assert info is not None and info["templates"] == len(gallery) == SUBJECTS * PER
    assert info["nlist"] == lists_for(len(gallery), CONFIG.ann_lists_factor) == 502
    rng = np.random.default_rng(1)
    who = rng.choice(SUBJECTS, size=150, replace=False)
    probes = np.concatenate(
        [
            world.faces.genuine_probes(world.identities[who]),
            world.faces.templates(world.faces.identities(50), 1),  # never enrolled
        ]
    )
    statuses = set()
    for q, probe in enumerate(probes):
        got = gallery.search(probe, k=CONFIG.top_k)
        want = gallery.search(probe, k=CONFIG.top_k, exact=True)
        mine = decide(got, CONFIG.threshold, CONFIG.margin)
        exact = decide(want, CONFIG.threshold, CONFIG.margin)
        assert (mine.status, mine.subject_id) == (exact.status, exact.subject_id)
        if q < len(who):  # genuine: the same subject with the exact cosine (re-ranked)
            assert got[0].subject_id == want[0].subject_id == f"s{who[q]}"
            assert got[0].score == pytest.approx(want[0].score, abs=1e-6)
        else:  # impostor: the index may miss a far neighbour, so only ever score lower
            assert got[0].score <= want[0].score + 1e-6
        statuses.add(mine.status)
    assert statuses == {"match", "no_match"}
    # Every open search used the index; a weak best score also searched it deeper.
    assert ann_calls.count(CONFIG.ann_pool) == len(probes)
    assert set(ann_calls) == {CONFIG.ann_pool, CONFIG.ann_recheck_pool}


def test_erased_subjects_are_never_returned(world: World) -> None:
    gallery = _gallery(world)
    before = len(gallery)
    gone = [*range(0, SUBJECTS, 97), SUBJECTS - 1, SUBJECTS - 2]  # tail rows move too
    assert sum(gallery.remove(f"s{i}") for i in gone) == PER * len(gone)
    info = gallery.index_info()
    assert info is not None and info["templates"] == len(gallery) == before - PER * len(gone)
    for i in gone:
        for vec in world.templates[i * PER : (i + 1) * PER]:  # cosine 1.0 to an erased row
            names = {m.subject_id for m in gallery.search(vec, k=CONFIG.top_k)}
            assert f"s{i}" not in names
            assert f"s{i}" not in {m.subject_id for m in gallery.search(vec, exact=True)}
    # The survivors the removals moved around are still found, by index and exactly.
    for i in (1, SUBJECTS - 3, SUBJECTS // 2):
        assert gallery.search(world.templates[i * PER], k=1)[0].subject_id == f"s{i}"


def test_adds_are_visible_immediately(world: World, ann_calls: list[int]) -> None:
    gallery = _gallery(world)
    new = world.faces.identities(40)
    for i, identity in enumerate(new):
        gallery.add_many(f"new{i}", world.faces.templates(identity[None], PER))
        probe = world.faces.genuine_probes(identity[None])[0]
        decision = decide(gallery.search(probe), CONFIG.threshold, CONFIG.margin)
        assert (decision.status, decision.subject_id) == ("match", f"new{i}")
    assert ann_calls  # found through the index, not an exact fallback
    info = gallery.index_info()
    assert info is not None and info["templates"] == len(gallery)


def test_phone_digit_narrowing_is_exact(world: World, ann_calls: list[int]) -> None:
    gallery = _gallery(world)
    rng = np.random.default_rng(2)
    for i in rng.choice(SUBJECTS, size=20, replace=False):
        tag = world.last4[i]
        members = [j for j in range(SUBJECTS) if world.last4[j] == tag]
        probe = world.faces.genuine_probes(world.identities[i : i + 1])[0]
        got = gallery.search(probe, k=100, tag_filter={"phone_last4": tag})
        best = {
            f"s{j}": float(np.max(world.templates[j * PER : (j + 1) * PER] @ probe))
            for j in members
        }
        want = sorted(best.items(), key=lambda kv: kv[1], reverse=True)
        assert [m.subject_id for m in got] == [s for s, _ in want]
        np.testing.assert_allclose([m.score for m in got], [v for _, v in want], atol=1e-5)
    assert not ann_calls  # narrowed searches never touch the approximate index


def test_concurrent_searches_updates_and_rebuild(world: World) -> None:
    gallery = _gallery(world)
    erased: set[str] = set()
    violations: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    victims = list(range(1, SUBJECTS, 53))

    def searcher(offset: int) -> None:
        try:
            i = offset
            while not stop.is_set():
                j = victims[i % len(victims)]
                gone_before = set(erased)  # erased before this search started
                for m in gallery.search(world.templates[j * PER], k=CONFIG.top_k):
                    if m.subject_id in gone_before:
                        violations.append(m.subject_id)
                i += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=searcher, args=(n,)) for n in range(2)]
    threads.append(threading.Thread(target=gallery.rebuild_index, kwargs={"seed": 5}))
    for thread in threads:
        thread.start()
    new = world.faces.identities(len(victims))
    try:
        for n, j in enumerate(victims):
            gallery.remove(f"s{j}")
            erased.add(f"s{j}")
            gallery.add_many(f"new{n}", world.faces.templates(new[n : n + 1], PER))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors and not violations
    assert not any(thread.is_alive() for thread in threads)
    info = gallery.index_info()
    assert info is not None and info["templates"] == len(gallery) == SUBJECTS * PER
    for n, j in enumerate(victims):
        assert f"s{j}" not in {m.subject_id for m in gallery.search(world.templates[j * PER])}
        assert gallery.search(world.faces.templates(new[n : n + 1], 1)[0], k=1)[0].subject_id == (
            f"new{n}"
        )


def test_rebuild_reconciles_changes_made_while_it_runs(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    gallery = _gallery(world, build=False)
    monkeypatch.setattr("pipeline.gallery._BUILD_CHUNK", 4_096)
    original_train, original_add = IvfIndex.train.__func__, IvfIndex.add  # type: ignore[attr-defined]
    new = world.faces.identities(6)
    fills = 0

    def train(cls: type[IvfIndex], sample: np.ndarray, nlist: int, codec: ann.Codec) -> IvfIndex:
        index = original_train(cls, sample, nlist, codec)
        gallery.remove("s5")  # a row the build has not read yet
        gallery.add_many("new0", world.faces.templates(new[:1], PER))
        return index

    def add(self: IvfIndex, vectors: np.ndarray, ids: np.ndarray) -> None:
        nonlocal fills
        original_add(self, vectors, ids)
        fills += 1
        if fills == 1:  # after the first chunk: new0's tail rows move into s3's read holes
            gallery.remove("s3")
            gallery.remove(f"s{SUBJECTS - 1}")
            gallery.add_many("new1", world.faces.templates(new[1:2], PER))

    monkeypatch.setattr(IvfIndex, "train", classmethod(train))
    monkeypatch.setattr(IvfIndex, "add", add)
    assert gallery.rebuild_index()
    info = gallery.index_info()
    assert info is not None and info["templates"] == len(gallery) == (SUBJECTS - 3 + 2) * PER
    for gone in (5, 3, SUBJECTS - 1):
        names = {m.subject_id for m in gallery.search(world.templates[gone * PER])}
        assert f"s{gone}" not in names
    for n in (0, 1):
        probe = world.faces.genuine_probes(new[n : n + 1])[0]
        assert gallery.search(probe, k=1)[0].subject_id == f"new{n}"
    for kept in (4, 6, SUBJECTS - 2):  # neighbours of the holes are untouched
        assert gallery.search(world.templates[kept * PER], k=1)[0].subject_id == f"s{kept}"


def test_small_galleries_stay_exact_and_staleness_follows_size(world: World) -> None:
    config = MatchConfig(exact_max_templates=3_000, ann_rebuild_growth=2.0)
    gallery = Gallery(config=config)
    for i in range(999):  # 2,997 templates: below the threshold
        gallery.add_many(f"s{i}", world.templates[i * PER : (i + 1) * PER])
    assert not gallery.index_stale() and gallery.index_info() is None
    gallery.add_many("s999", world.templates[2997:3000])
    assert gallery.index_stale()
    assert gallery.rebuild_index()
    assert not gallery.index_stale()
    for i in range(1000, 2001):  # doubling the gallery makes the centroids stale
        gallery.add_many(f"s{i}", world.templates[i * PER : (i + 1) * PER])
    assert gallery.index_stale()


def test_flat_codec_and_directory_background_rebuild(world: World) -> None:
    directory = Directory(MatchConfig(exact_max_templates=2_000, ann_codec="flat"))
    for i in range(700):
        directory.add(f"s{i}", list(world.templates[i * PER : (i + 1) * PER]), world.last4[i])
    assert directory.wait_index(timeout=120)
    info = directory.gallery.index_info()
    assert info is not None and info["codec"] == "flat" and info["templates"] == 2_100
    probe = world.faces.genuine_probes(world.identities[42:43])[0]
    assert directory.identify(probe).subject_id == "s42"
    assert directory.identify(probe, phone_last4=world.last4[42]).subject_id == "s42"
    directory.remove("s42")
    assert directory.identify(probe).status == "no_match"


def test_narrow_index_match_is_rechecked_deeper(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Alice 0.70, a twin 0.66 (inside the margin: ambiguous) and a cousin 0.60 to the probe.
    # The first index search is made to miss the twin; alone it would then call a match
    # (lead 0.10 over the cousin), which the narrow lead sends to a deeper search.
    rng = np.random.default_rng(3)
    probe = world.identities[5000]

    def at(cos: float) -> np.ndarray:
        step = rng.standard_normal(probe.shape).astype(np.float32)
        step -= (step @ probe) * probe
        return (cos * probe + np.sqrt(1 - cos**2) * step / np.linalg.norm(step)).astype(np.float32)

    directory = Directory(MatchConfig(exact_max_templates=1_000))
    directory.gallery.add("twin", at(0.66))  # template id 0
    directory.gallery.add("alice", at(0.70))
    directory.gallery.add("cousin", at(0.60))
    for i in range(400):
        directory.gallery.add_many(f"s{i}", world.templates[i * PER : (i + 1) * PER])
    assert directory.gallery.rebuild_index() and directory.gallery.approximate()
    exact = directory.gallery.search(probe, exact=True)
    assert [m.subject_id for m in exact[:3]] == ["alice", "twin", "cousin"]
    assert decide(exact, 0.45, 0.08).status == "ambiguous"

    original = IvfIndex.search

    def missing_twin(self: IvfIndex, vec: np.ndarray, pool: int, nprobe: int) -> np.ndarray:
        found = original(self, vec, pool, nprobe)
        shallow = nprobe == directory.match.ann_nprobe
        return found[found != 0] if shallow else found

    monkeypatch.setattr(IvfIndex, "search", missing_twin)
    assert "twin" not in {m.subject_id for m in directory.gallery.search(probe)}
    decision = directory.identify(probe)
    assert (decision.status, directory.rechecks) == ("ambiguous", 1)
    # A clear match (no look-alike near it) is not re-checked.
    clear = world.faces.genuine_probes(world.identities[7:8])[0]
    assert directory.identify(clear).subject_id == "s7"
    assert decide(directory.gallery.search(probe), 0.45, 0.08).status == "match"  # index alone
    assert directory.rechecks == 1


async def test_directory_load_builds_the_index_before_serving(world: World, redis_url: str) -> None:
    client = aioredis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
    try:
        store = Store(client, TemplateCipher(generate_key()))
        passhash = PassphraseHasher(time_cost=1, memory_kib=64).hash("open sesame 42")
        subjects = []
        for i in range(350):  # 1,050 templates: above the forced 1,000 exact limit
            rows = list(world.templates[i * PER : (i + 1) * PER])
            phone = f"+861380000{i:04d}"
            _, sid = await store.create_account(f"a{i}", "A Person", phone, passhash, rows, CONSENT)
            subjects.append(sid)
        directory = Directory(MatchConfig(exact_max_templates=1_000))
        assert await directory.load(store) == 350
    finally:
        await client.aclose()
    gallery = directory.gallery
    info = gallery.index_info()
    assert gallery.approximate() and info is not None and info["templates"] == 1_050
    probe = world.faces.genuine_probes(world.identities[17:18])[0]
    assert directory.identify(probe).subject_id == subjects[17]
    assert directory.identify(probe, phone_last4="0017").subject_id == subjects[17]


@pytest.mark.parametrize(
    "bad",
    [
        {"exact_max_templates": 999},
        {"ann_nprobe": 0},
        {"ann_pool": 8},
        {"ann_lists_factor": 0.1},
        {"ann_rebuild_growth": 1.0},
        {"ann_codec": "pq"},
        {"ann_recheck_band": -0.01},
        {"ann_recheck_nprobe": 0},
        {"ann_recheck_pool": 15},
        {"ann_threads": 2},  # unknown field
    ],
)
def test_match_config_bounds(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        MatchConfig(**bad)  # type: ignore[arg-type]


def test_lists_for() -> None:
    assert lists_for(1_000_000, 4.0) == 4_000
    assert lists_for(10, 4.0) == ann.MIN_LISTS
    with pytest.raises(ValueError):
        lists_for(0, 4.0)


def test_bench_gallery_command(capsys: pytest.CaptureFixture[str]) -> None:
    small = ["--size", "10000", "--queries", "40", "--impostors", "10"]
    argv = ["bench-gallery", *small, "--exact-queries", "3", "--updates", "5", "--seed", "4"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size"] == 10_000 and report["subjects"] == 3_334
    assert report["erased_returned"] == 0 and report["added_missed"] == 0
    assert report["recall_at_1"] >= 0.99 and report["params"]["codec"] == "sq8"
    assert set(report["search_ms"]) == {"p50", "p99"}
    assert report["exact_decisions"]["genuine"]["match"] >= 38
    # Genuine probes over the whole accepted range, accuracy per band; fail-open counted.
    assert report["fail_open"] == 0 and report["fail_open_index_only"] == 0
    assert list(report["bands"]) == ["0.45-0.50", "0.50-0.55", "0.55-0.65", "0.65-0.80", "impostor"]
    assert [b["probes"] for b in report["bands"].values()] == [10, 10, 10, 10, 10]
    assert all(0 <= report["bands"][b]["recall_at_1"] <= 1 for b in list(report["bands"])[:4])
    for bad in (["--size", "100"], ["--nprobe", "0"], ["--queries", "0"]):
        assert cli.main(["bench-gallery", *bad]) == 2
        assert json.loads(capsys.readouterr().out)["error"] == "usage"


def test_removed_codes_do_not_stay_in_the_index_memory() -> None:
    """faiss unlists an entry by moving its list's last entry into its slot and shrinking
    the list, which keeps what lay past the new end: an erased template's code (SQ8, the
    template to 8 bits) must not be left there, nor a stale copy of one moved earlier."""
    import faiss

    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((2_000, 128)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = IvfIndex.train(vecs, 16)
    index.add(vecs, np.arange(len(vecs), dtype=np.int64))
    lists = faiss.extract_index_ivf(index._index).invlists
    size = lists.code_size
    list_no = max(range(index.nlist), key=lists.list_size)
    n = lists.list_size(list_no)

    def stored(count: int) -> np.ndarray:
        # The list's storage up to its former length: shrinking keeps that much allocated.
        ptr = lists.get_codes(list_no)
        codes = faiss.rev_swig_ptr(ptr, count * size).copy().reshape(count, size)
        lists.release_codes(list_no, ptr)
        return codes

    ptr = lists.get_ids(list_no)
    ids = faiss.rev_swig_ptr(ptr, n).copy()
    lists.release_ids(list_no, ptr)
    before = stored(n)
    code_of = {int(t): before[i] for i, t in enumerate(ids)}
    # The last entry; the first (the last one moves into its slot); then that moved one.
    gone = [int(ids[-1]), int(ids[0]), int(ids[-2])]
    for tid in gone:
        assert index.remove(np.array([tid], dtype=np.int64)) == 1
    assert index.remove(np.array(gone, dtype=np.int64)) == 0  # absent ids are ignored
    after = stored(n)
    for tid in gone:
        assert not (after == code_of[tid]).all(axis=1).any()
    assert lists.list_size(list_no) == n - 3
    for row in range(n - 3):  # the entries kept still hold their own codes
        np.testing.assert_array_equal(after[row], code_of[int(lists.get_single_id(list_no, row))])
    for tid in gone:
        assert tid not in index.search(vecs[tid], pool=50, nprobe=16).tolist()
    kept = int(ids[1])
    assert index.search(vecs[kept], pool=1, nprobe=16).tolist() == [kept]
