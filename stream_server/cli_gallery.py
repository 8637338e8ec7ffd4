"""``facepay bench-gallery``: 1:N search at gallery sizes no test photo set reaches.

Builds a synthetic gallery (default 1M templates), trains the ANN index as the server would,
then measures one-probe-at-a-time search latency (ANN + exact re-rank, and exact search for
comparison), recall@1 of the ANN against exact search, decision agreement, phone-digit
narrowed search, adds and erasures while another thread keeps searching, build time and
memory. One JSON object on stdout.

The synthetic model (why it is representative, and its limits, in docs/gallery.md): every
identity is a unit vector made of a shared population direction, one of 256 "group"
directions (faces that look alike: same demographics, similar build) and an individual part,
so impostor cosines average ~0.04 with a same-group tail near 0.2-0.3, as MobileFaceNet's do.
Templates are the identity plus noise so that two templates of one person have cosine ~0.70;
a genuine probe is a fresh noisy sample whose cosine to the enrolled templates is drawn over
the whole accepted range, 0.45 (the match threshold) to 0.80, an equal number in each of
``PROBE_BANDS`` (accuracy is reported per band: near the threshold the index misses most);
an impostor probe is a sample of an identity that was never enrolled.
"""

from __future__ import annotations

import argparse
import gc
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_server.cli import EXIT_OK, EXIT_USAGE, emit, say
from stream_server.gallery_bands import BandAccuracy

Floats = npt.NDArray[np.float32]

GROUPS = 256
POPULATION_WEIGHT = 0.05  # squared weight of the shared direction in every identity
GROUP_WEIGHT = 0.25  # squared weight of the group direction
TEMPLATE_COS = 0.837  # template vs its identity, so two templates of one person ~0.70
PROBE_TEMPLATE_COS = (0.55, 0.80)  # genuine_probes' default: a typical capture
# The benchmark's genuine probes: from the threshold up, uniform within each band.
PROBE_BANDS = ((0.45, 0.50), (0.50, 0.55), (0.55, 0.65), (0.65, 0.80))


def _unit(x: Floats) -> Floats:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _noisy(rng: np.random.Generator, base: Floats, cos: Floats | float) -> Floats:
    """Unit samples around unit ``base`` rows with cosine ``cos`` to them (high-dim approx.)."""
    cos_arr = np.broadcast_to(np.asarray(cos, dtype=np.float32), (len(base),))
    spread = np.sqrt(1.0 / np.square(cos_arr) - 1.0).astype(np.float32)[:, None]
    noise = _unit(rng.standard_normal(base.shape).astype(np.float32))
    return _unit((base + spread * noise).astype(np.float32))


class SyntheticFaces:
    """The synthetic identity model: see the module docstring."""

    def __init__(self, seed: int, dim: int = 128) -> None:
        self.rng = np.random.default_rng(seed)
        self.dim = dim
        self.population = _unit(self.rng.standard_normal(dim).astype(np.float32))
        self.groups = _unit(self.rng.standard_normal((GROUPS, dim)).astype(np.float32))

    def identities(self, n: int) -> Floats:
        """``n`` new identity directions."""
        rng, dim = self.rng, self.dim
        group = self.groups[rng.integers(0, GROUPS, size=n)]
        own = _unit(rng.standard_normal((n, dim)).astype(np.float32))
        rest = 1.0 - POPULATION_WEIGHT - GROUP_WEIGHT
        mix = np.sqrt(POPULATION_WEIGHT) * self.population + np.sqrt(GROUP_WEIGHT) * group
        return _unit(mix + np.sqrt(rest) * own)

    def templates(self, identities: Floats, per_subject: int) -> Floats:
        """``per_subject`` enrolment templates per identity, subject-major order."""
        return _noisy(self.rng, np.repeat(identities, per_subject, axis=0), TEMPLATE_COS)

    def genuine_probes(
        self, identities: Floats, cos: tuple[float, float] = PROBE_TEMPLATE_COS
    ) -> Floats:
        """One fresh capture per identity, cosine uniform in ``cos`` to its templates."""
        want = self.rng.uniform(cos[0], cos[1], size=len(identities)).astype(np.float32)
        return _noisy(self.rng, identities, want / TEMPLATE_COS)


def register(sub: Any) -> None:
    """Add the ``bench-gallery`` sub-command."""
    p = sub.add_parser(
        "bench-gallery",
        help="benchmark 1:N search on a big synthetic gallery (ANN vs exact)",
        description="Build N synthetic templates, train the ANN index and report search "
        "latency, recall@1 against exact search, update latency, build time and memory.",
    )
    p.add_argument("--size", type=int, default=1_000_000, help="templates (1000000)")
    p.add_argument("--per-subject", type=int, default=3, help="templates per subject (3)")
    p.add_argument("--queries", type=int, default=2000, help="genuine probes (2000)")
    p.add_argument("--impostors", type=int, default=250, help="impostor probes (250)")
    p.add_argument("--exact-queries", type=int, default=100, help="timed exact searches (100)")
    p.add_argument("--updates", type=int, default=200, help="adds and erasures timed (200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--nprobe", type=int, default=None, help="override MatchConfig.ann_nprobe")
    p.add_argument("--pool", type=int, default=None, help="override MatchConfig.ann_pool")
    p.add_argument("--recheck-nprobe", type=int, default=None, help="override ann_recheck_nprobe")
    p.add_argument("--recheck-pool", type=int, default=None, help="override ann_recheck_pool")
    p.add_argument("--codec", choices=("sq8", "flat"), default=None, help="index codes")
    p.add_argument("--lists-factor", type=float, default=None, help="override ann_lists_factor")
    p.set_defaults(handler=cmd_bench_gallery)


def _usage(message: str) -> int:
    say(f"facepay bench-gallery: {message}")
    emit({"error": "usage", "message": message})
    return EXIT_USAGE


def cmd_bench_gallery(args: argparse.Namespace) -> int:
    """Run the benchmark; exit 0, or 2 on bad options."""
    from pydantic import ValidationError

    from pipeline.config import MatchConfig

    overrides = {
        "ann_nprobe": args.nprobe,
        "ann_pool": args.pool,
        "ann_recheck_nprobe": args.recheck_nprobe,
        "ann_recheck_pool": args.recheck_pool,
        "ann_codec": args.codec,
        "ann_lists_factor": args.lists_factor,
    }
    try:
        config = MatchConfig(
            **{k: v for k, v in overrides.items() if v is not None},
            exact_max_templates=min(50_000, max(1_000, args.size)),
        )
    except ValidationError as exc:
        return _usage(str(exc).splitlines()[0])
    if not 10_000 <= args.size <= 20_000_000:
        return _usage("--size must be within 10000..20000000")
    if not 1 <= args.per_subject <= 20:
        return _usage("--per-subject must be within 1..20")
    for name in ("queries", "impostors", "exact_queries", "updates"):
        if not 1 <= getattr(args, name) <= 100_000:
            return _usage(f"--{name.replace('_', '-')} must be within 1..100000")
    emit(run_benchmark(args, config))
    return EXIT_OK


def _ms(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples) * 1e3
    return {"p50": round(float(np.median(arr)), 3), "p99": round(float(np.percentile(arr, 99)), 3)}


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


def _timed(fn: Any, *a: Any, **kw: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - start


def run_benchmark(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    """Build, index and measure; returns the report (keys in docs/gallery.md)."""
    import faiss

    from pipeline.gallery import decide
    from session.directory import Directory

    per = args.per_subject
    n_subjects = -(-args.size // per)
    faces = SyntheticFaces(args.seed)
    say(f"bench-gallery: generating {args.size} templates of {n_subjects} subjects")
    identities = faces.identities(n_subjects)
    templates = np.empty((n_subjects * per, faces.dim), dtype=np.float32)
    for a in range(0, n_subjects, 100_000):
        b = min(n_subjects, a + 100_000)
        templates[a * per : b * per] = faces.templates(identities[a:b], per)
    templates = templates[: args.size]
    truth = faces.rng.choice(n_subjects - 1, size=args.queries)  # the last may be short
    band_of = np.arange(args.queries) * len(PROBE_BANDS) // args.queries
    genuine = np.empty((args.queries, faces.dim), dtype=np.float32)
    for b, cos in enumerate(PROBE_BANDS):
        genuine[band_of == b] = faces.genuine_probes(identities[truth[band_of == b]], cos)
    probes = np.concatenate([genuine, faces.templates(faces.identities(args.impostors), 1)])
    last4 = [f"{d:04d}" for d in faces.rng.integers(0, 10_000, size=n_subjects)]
    sid = [f"s{i}" for i in range(n_subjects)]
    del identities

    rss0 = _rss_mb()
    directory = Directory(config, dim=faces.dim)
    gallery = directory.gallery  # filled directly: Directory.add would rebuild as it grows
    start = time.perf_counter()
    for i in range(n_subjects):
        rows = templates[i * per : (i + 1) * per]
        if len(rows):
            gallery.add_many(sid[i], rows, tags={"phone_last4": last4[i]})
    load_s = time.perf_counter() - start
    rss1 = _rss_mb()
    say(f"bench-gallery: loaded in {load_s:.1f} s; training the index")
    built, build_s = _timed(gallery.rebuild_index, seed=args.seed)
    assert built
    rss2 = _rss_mb()
    info = gallery.index_info() or {}

    say("bench-gallery: exact ground truth (batched)")
    _, top = faiss.knn(probes, templates, 16, metric=faiss.METRIC_INNER_PRODUCT)
    owners = top // per

    say("bench-gallery: timing searches")
    full_gcs = gc.get_stats()[2]["collections"]  # a full GC walks every subject's objects
    k = config.top_k
    # identify, then the index search, each in its own pass over the probes: timed back to
    # back on one probe, the second would find the first's lists in the CPU caches.
    decisions, identify_t = zip(*(_timed(directory.identify, p) for p in probes), strict=True)
    deep_before = gallery.deep_searches
    searched, ann_t = zip(*(_timed(gallery.search, p, k=k) for p in probes), strict=True)
    deep_searches = gallery.deep_searches - deep_before
    hits = correct = 0
    flips: dict[str, Counter[str]] = {"identify": Counter(), "index_only": Counter()}
    exact_decisions: dict[str, Counter[str]] = {"genuine": Counter(), "impostor": Counter()}
    impostor_best: list[float] = []
    bands = BandAccuracy([f"{lo:.2f}-{hi:.2f}" for lo, hi in PROBE_BANDS], band_of)
    for q, (probe, matches, decision) in enumerate(zip(probes, searched, decisions, strict=True)):
        want = decide(
            _exact_matches(probe, templates, top[q], owners[q], sid, k),
            config.threshold,
            config.margin,
        )
        raw = decide(matches, config.threshold, config.margin)
        kind = "genuine" if q < args.queries else "impostor"
        exact_decisions[kind][want.status] += 1
        if kind == "impostor":
            impostor_best.append(want.score)
        for name, got in (("identify", decision), ("index_only", raw)):
            if (got.status, got.subject_id) != (want.status, want.subject_id):
                flips[name][f"{want.status}->{got.status}"] += 1
        hit = q < args.queries and matches[0].subject_id == sid[int(top[q][0]) // per]
        bands.add(q, want, decision, raw, hit)
        if q < args.queries:
            hits += hit
            correct += matches[0].subject_id == sid[truth[q]]
    rechecks = directory.rechecks
    full_gcs = gc.get_stats()[2]["collections"] - full_gcs
    exact_t = [_timed(gallery.search, p, k=k, exact=True)[1] for p in probes[: args.exact_queries]]
    tag_t: list[float] = []
    tag_hits = 0
    for q in range(args.queries):
        who = int(truth[q])
        res, dt = _timed(directory.identify, probes[q], phone_last4=last4[who])
        tag_t.append(dt)
        tag_hits += res.subject_id == sid[who]
    updates = _updates_while_serving(gallery, faces, probes, templates, sid, per, args.updates, k)
    return {
        "size": len(gallery),
        "subjects": n_subjects,
        "templates_per_subject": per,
        "queries": {"genuine": args.queries, "impostor": args.impostors},
        "load_s": round(load_s, 2),
        "build_s": round(build_s, 2),
        "memory_mb": {
            "gallery_rss": round(rss1 - rss0, 1),
            "index_rss": round(rss2 - rss1, 1),
            "vectors": round(len(gallery) * faces.dim * 4 / 2**20, 1),
            "index": round(int(info.get("memory_bytes", 0)) / 2**20, 1),  # type: ignore[call-overload]
            "peak_rss": round(_peak_rss_mb(), 1),
        },
        "search_ms": _ms(list(identify_t)),
        "index_search_ms": _ms(list(ann_t)),
        "exact_ms": _ms(exact_t),
        "tag_ms": _ms(tag_t),
        "recall_at_1": round(hits / args.queries, 4),
        "identity_at_1": round(correct / args.queries, 4),
        "tag_identity_at_1": round(tag_hits / args.queries, 4),
        "decision_agreement": round(1 - sum(flips["identify"].values()) / len(probes), 4),
        "decision_agreement_index_only": round(
            1 - sum(flips["index_only"].values()) / len(probes), 4
        ),
        "disagreements": {name: dict(c) for name, c in flips.items()},
        # Disagreements where identify (or the index search alone) says match and exact
        # search does not, or names another subject: those skip the phone-digit step.
        "fail_open": bands.total["identify"],
        "fail_open_index_only": bands.total["index_only"],
        "bands": bands.report(),
        "rechecks": rechecks,
        "declined": directory.declined,  # index matches declined below ann_decline_below
        "deep_searches": deep_searches,  # index searches repeated deeper, of the probes
        "exact_decisions": {kind: dict(c) for kind, c in exact_decisions.items()},
        "impostor_best": {
            f"p{p}": round(float(np.percentile(impostor_best, p)), 4) for p in (50, 99)
        },
        "full_gcs_while_timing": full_gcs,
        **updates,
        "params": {
            **info,
            "exact_max_templates": config.exact_max_templates,
            "deep_below": config.ann_deep_below,
            "decline_below": config.ann_decline_below,
            "faiss_threads": faiss.omp_get_max_threads(),
        },
    }


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _exact_matches(
    probe: Floats, templates: Floats, top: Any, owners: Any, sid: list[str], k: int
) -> list[Any]:
    """Exact per-subject matches from the batched exact top-16 templates of one probe."""
    from pipeline.gallery import Match

    scores = templates[top] @ (probe / np.linalg.norm(probe))
    best: dict[int, float] = {}
    for owner, score in zip(owners.tolist(), scores.tolist(), strict=True):
        best[owner] = max(best.get(owner, -2.0), score)
    ranked = sorted(best.items(), key=lambda kv: kv[1], reverse=True)[:k]
    return [Match(sid[o], s) for o, s in ranked]


def _updates_while_serving(
    gallery: Any,
    faces: SyntheticFaces,
    probes: Floats,
    templates: Floats,
    sid: list[str],
    per: int,
    n: int,
    k: int,
) -> dict[str, Any]:
    """Time adds and erasures while a second thread searches without pause."""
    stop = threading.Event()
    search_t: list[float] = []

    def searcher() -> None:
        i = 0
        while not stop.is_set():
            search_t.append(_timed(gallery.search, probes[i % len(probes)], k=k)[1])
            i += 1

    thread = threading.Thread(target=searcher, name="bench-searcher")
    thread.start()
    add_t: list[float] = []
    remove_t: list[float] = []
    erased_returned = added_missed = 0
    new = faces.identities(n)
    victims = faces.rng.choice(len(sid) - 1, size=n, replace=False)
    try:
        for i in range(n):
            rows = faces.templates(new[i : i + 1], per)
            add_t.append(_timed(gallery.add_many, f"new{i}", rows, {"phone_last4": "0000"})[1])
            found = gallery.search(faces.genuine_probes(new[i : i + 1])[0], k=k)
            added_missed += found[0].subject_id != f"new{i}"
            victim = int(victims[i])
            remove_t.append(_timed(gallery.remove, sid[victim])[1])
            # The victim's own enrolment template, cosine 1.0 to what was just erased.
            found = gallery.search(templates[victim * per], k=k)
            erased_returned += sid[victim] in {m.subject_id for m in found}
    finally:
        stop.set()
        thread.join()
    return {
        "add_ms": _ms(add_t),
        "remove_ms": _ms(remove_t),
        "search_while_updating_ms": _ms(search_t),
        "searches_while_updating": len(search_t),
        "erased_returned": erased_returned,
        "added_missed": added_missed,
    }
