"""Typed, bounded configuration of the recognition pipeline.

Loaded once (by the command line or the server) and passed down; nothing here reads the
environment or files at import time. Every threshold has bounds, so a typo cannot switch a
check off (a liveness threshold of 0 or a match threshold of -1 is refused at load time).

Why the defaults are what they are (figures from ``facepay eval`` on ../shared/data/bench):
- ``match.threshold`` 0.45: on LFW View-1 train pairs the impostor cosines' 99.9th percentile
  is ~0.35 and the EER point ~0.25; a payment system must sit well into the impostor tail
  because 1:N search multiplies false-match chances by the gallery size. 0.45 keeps
  ~93% of LFW's hard, unaligned news-photo genuine pairs (camera captures of a cooperating
  shopper score higher: 0.53-0.98 on ../shared/data/faces) and a passphrase is still asked.
- ``match.margin`` 0.08: the best subject must beat the second by this much, else the search
  is ambiguous and asks for phone digits (look-alikes, twins).
- ``liveness.threshold`` 0.5: the reference operating point of MiniFASNet fusion (p_real);
  with squared crops it gave APCER 0 / BPCER 0 on NUAA's train subset, single frames. It is
  applied to the multi-frame fused score, not to single frames.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DetectorConfig(_Strict):
    """Face detector selection and thresholds."""

    name: Literal["yunet"] = "yunet"
    #: Real faces scored >= 0.88 on LFW (central faces, 861 images) and ~0.92-0.95 on the
    #: shared photos; background texture scored up to 0.70 (biden2.jpg's painting).
    score_threshold: float = Field(0.75, ge=0.3, le=0.99)
    nms_threshold: float = Field(0.3, ge=0.05, le=0.9)
    top_k: int = Field(50, ge=1, le=500)
    max_side: int = Field(640, ge=64, le=4096)


class EmbedderConfig(_Strict):
    """Embedder selection."""

    name: Literal["mobilefacenet"] = "mobilefacenet"
    flip_augment: bool = False


class LivenessConfig(_Strict):
    """Passive liveness model selection and operating point (fused p_real)."""

    name: Literal["minifasnet_fusion", "minifasnet_v2", "minifasnet_v1se"] = "minifasnet_fusion"
    threshold: float = Field(0.5, ge=0.2, le=0.99)


class QualityConfig(_Strict):
    """Per-frame quality gate (a frame failing it adds no evidence)."""

    min_face_px: float = Field(64.0, ge=32.0, le=1000.0)
    min_sharpness: float = Field(20.0, ge=0.0, le=2000.0)
    max_yaw_deg: float = Field(30.0, ge=5.0, le=60.0)
    max_pitch_deg: float = Field(25.0, ge=5.0, le=60.0)
    min_brightness: float = Field(40.0, ge=0.0, le=128.0)
    max_brightness: float = Field(215.0, ge=128.0, le=255.0)
    min_detection_score: float = Field(0.8, ge=0.3, le=0.99)
    #: A face whose squared box is more than this fraction of the frame's shorter side is
    #: ``too_close``: the frame adds no evidence and the person is asked to step back.
    #: MiniFASNet's 2.7x/4.0x context crops then shrink to under 1.25x the face. Live
    #: camera views of the shared photos scored 0.79-1.0 up to 0.63 and then fell with size
    #: (biden2 0.51 at 0.71, 0.24 at 0.79; obama2 0.36 at 0.94, declined as spoof), while
    #: image_T1, a genuine capture, still scored 1.0 at 0.74-0.80 (docs/pipeline.md). 1.0
    #: turns the check off. Single photos (imports, ``facepay analyze``) are not held to it.
    max_face_frac: float = Field(0.8, ge=0.4, le=1.0)
    #: ``cut_off``: a landmark nearer the frame's edge than this many eye distances
    #: (``pipeline.quality.edge_margin``). LFW photos cut at 5-45% of the face box from each
    #: side (145 people, 2,780 cut faces that passed the other checks), binned by this
    #: margin: genuine cosine to the uncut photo median 0.61 below 0 (13% under the 0.45
    #: match threshold), 0.73 in [0, 0.1), 0.79 in [0.1, 0.2), 0.84 in [0.2, 0.25), 0.87 in
    #: [0.25, 0.3) (1.7% under 0.45), 0.88-0.91 from 0.3 up (at most 0.5% under); cut-vs-cut
    #: pairs of different people at or above 0.45: 0.13% below 0, 0.06% in [0, 0.1), 0.01%
    #: in [0.1, 0.2), 0.004% in [0.25, 0.3), none from 0.3 up (uncut: none). With 45% cut
    #: from the top, YuNet can take the lower half of a face for a whole one, its "eyes" on
    #: the nostrils 0.28-0.33 eye distances below the edge (6 of 357 LFW photos, cosine
    #: 0.10-0.35 to the person): hence 0.35. Uncut photos sit far above: LFW min 0.54 (p1
    #: 1.31), shared photos 1.76-2.69, a passport-style crop ~1.0. At least 0: a landmark
    #: outside the frame always fails.
    min_edge_margin: float = Field(0.35, ge=0.0, le=1.0)
    #: ``cut_off`` as well: more than this share of the detector's unclipped box outside the
    #: frame. A backstop: YuNet's box mostly stops at the edge (a face cut 45% from the left
    #: or top still has a median 0-4% outside), but cut at the chin it reaches out (45%:
    #: median 29%). Uncut photos: 0; cut faces that pass the landmark margin: at most 0.2,
    #: with genuine cosines median 0.90 between 0.1 and 0.2.
    max_outside_frac: float = Field(0.2, ge=0.0, le=0.5)
    #: ``upside_down`` (``pipeline.orientation``): the face scores more than this much higher
    #: in the frame turned 180 degrees. 500 LFW photos: upright, every face scored at least
    #: 0.026 lower turned (median 0.098); the same photos upside down (402 detected) scored
    #: at least 0.022 higher turned (median 0.086); the 16 faces of the shared photos differ
    #: by 0.034-0.165 either way. Above 0.02 some upside-down faces would pass.
    upside_down_margin: float = Field(0.0, ge=0.0, le=0.02)


class EvidenceConfig(_Strict):
    """How much video a verdict needs, and how frame scores are fused."""

    min_frames: int = Field(5, ge=2, le=300)
    #: At least 0.1 s: frames a few milliseconds apart are one moment, not video.
    min_span_s: float = Field(0.3, ge=0.1, le=30.0)
    window_s: float = Field(3.0, ge=0.3, le=60.0)
    max_frames: int = Field(60, ge=2, le=1000)
    #: Fraction of the lowest single-frame liveness scores ignored by the fusion: a genuine
    #: face scored as low as 0.33 on single frames (blur, a blink) and must not flip to spoof.
    trim_low: float = Field(0.2, ge=0.0, le=0.5)
    #: A spoof verdict is allowed early when this many frames are all far below the
    #: threshold (p_real < spoof_floor): a print or a screen rarely scores above 0.05.
    spoof_fast_frames: int = Field(4, ge=2, le=300)
    spoof_floor: float = Field(0.1, ge=0.0, le=0.5)
    #: Scored frames needed before a *moderately* low fused score (above the fast-exit
    #: floor) becomes a spoof verdict; None = ``min_frames``. Prints and screens score near
    #: 0 and take the fast exit; a live face whose context crop briefly holds another
    #: person (two walkers crossing) dips to 0.2-0.5 and deserves more video first.
    spoof_min_frames: int | None = Field(None, ge=2, le=300)
    #: Use the landmark-rigidity cue (planar motion) as extra spoof evidence. Off by default:
    #: see docs/pipeline.md, measured on synthetic streams only.
    use_rigidity: bool = False
    rigidity_min_frames: int = Field(10, ge=4, le=300)
    #: A frame whose embedding is below this cosine to the mean of the window's live-scored
    #: frames shows someone else: the window is dropped and the evidence starts again from
    #: that frame (pipeline/evidence.py), so one person's frames never complete another's
    #: verdict. The tracker alone only vetoes below 0.3, which strangers under one camera
    #: reach (NUAA live frames: 7.5% of impostor pairs). Measured one frame against the
    #: mean of three other live frames (NUAA live, 9 people, 1,800 draws each): the same
    #: person scored 0.63 at the 0.1th percentile (0.72 at the 5th), another person 0.45 at
    #: the 99.9th and 0.48 at most. 0.5 is the gap's middle; a wrong restart only delays a
    #: decision by ``min_span_s``.
    same_person_min_cos: float = Field(0.5, ge=0.3, le=0.9)

    @model_validator(mode="after")
    def _fits_the_window(self) -> EvidenceConfig:
        # A window that can never hold the frames a verdict needs would leave every face
        # undecided (spoof_min_frames: a non-fast spoof could never be called).
        needed = max(self.min_frames, self.spoof_min_frames or 0, self.spoof_fast_frames)
        if needed > self.max_frames:
            raise ValueError(f"max_frames ({self.max_frames}) is below the {needed} frames needed")
        return self


class TrackerConfig(_Strict):
    """Face tracking across frames (see ``pipeline.tracker.Tracker``)."""

    iou_threshold: float = Field(0.3, ge=0.05, le=0.95)
    max_missed: int = Field(15, ge=1, le=300)
    max_age_s: float = Field(1.0, ge=0.1, le=30.0)
    #: A detection whose embedding is below this cosine to a track's mean never joins it,
    #: whatever the boxes say. Most pairs of different people score below 0.3 (NUAA
    #: impostor pairs: median 0.11, p95 0.35; LFW's equal-error point is ~0.24), while one
    #: face's own frames can dip far lower than frontal webcam frames suggest (NUAA: min
    #: 0.77 to their person's mean): the 5-person scene's print, turning as it is held up,
    #: fell to 0.54 offline and below 0.4 over WebRTC, so 0.4 or 0.5 split its track and
    #: it was denied twice (tests/test_gate_e2e.py). A look-alike above the veto who
    #: alternates their own face with a victim's print in one box does not blend the two
    #: identities either: a verdict's identity comes only from frames scored live
    #: (pipeline/evidence.py; tests/test_stream_identity.py). At least 0.3: below it
    #: unrelated faces would share tracks.
    embedding_threshold: float = Field(0.3, ge=0.3, le=0.9)
    relink_threshold: float = Field(0.6, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _relink_above_veto(self) -> TrackerConfig:
        if self.relink_threshold < self.embedding_threshold:
            raise ValueError("relink_threshold must be at least embedding_threshold")
        return self


class SelectionConfig(_Strict):
    """Which models run on which face, per frame (see docs/gate.md).

    Detection and tracking run on every analysed frame; the expensive per-face models run
    only where they still add evidence.
    """

    #: A track stops being embedded once its window holds this many embeddings, except in
    #: frames whose liveness is scored (each score needs its frame's identity checked).
    max_embeddings: int = Field(3, ge=1, le=60)
    #: Once a track has ``evidence.min_frames`` liveness scores, score it every N frames.
    liveness_every: int = Field(2, ge=1, le=30)
    #: Decided tracks get detection and tracking only (no liveness) ...
    skip_decided: bool = True
    #: ... except an embedding every N frames, so the tracker can still veto a different
    #: person stepping into a decided track's place (measured: without it, a walker who
    #: took the spot of one who had just passed was absorbed and never decided).
    recheck_every: int = Field(5, ge=1, le=60)
    #: Embed/score at most this many faces per frame: undecided first, then larger.
    max_faces_per_frame: int = Field(5, ge=1, le=50)


class ChangeConfig(_Strict):
    """The idle check before the detector (``pipeline/motion.py``, gates only).

    While nobody is tracked, a frame whose grey thumbnail (8x8 block means at 640x480)
    differs from the last frame the detector found empty in fewer than ``min_fraction`` of
    its pixels, by more than ``pixel_delta`` grey levels, skips the detector. Measured on the
    rendered walk-through scenes of 1 and 3 people entering an empty corridor (sensor noise
    2 grey levels, exposure drift 5 %, four backgrounds from near black to near white, one
    skin-toned): the empty corridor changed 0 % of the thumbnail at 16 levels; every frame in
    which the detector found a face (from 45 px, just in view) changed 0.8 % or more. The
    default bound, 0.2 %, sits four times below that; an error costs a detector run or a
    delay of at most ``max_still_s``, never a decision.
    """

    enabled: bool = True
    #: Grey levels (0-255) a block mean must move to count as changed.
    pixel_delta: float = Field(16.0, ge=2.0, le=128.0)
    #: Share of the thumbnail that must change for a full look (0.002: 10 of 4,800 blocks).
    min_fraction: float = Field(0.002, ge=0.0002, le=0.2)
    #: A view that has not changed still gets a full look this often (seconds).
    max_still_s: float = Field(1.0, ge=0.1, le=10.0)


class MatchConfig(_Strict):
    """1:N acceptance: above threshold AND ahead of the second-best subject by margin."""

    #: Floors: 0.35 is well above LFW's equal-error point (~0.24), and a margin of 0 would
    #: pick one of two identical twins instead of declining ``ambiguous``.
    threshold: float = Field(0.45, ge=0.35, le=0.95)
    margin: float = Field(0.08, ge=0.02, le=0.5)
    top_k: int = Field(5, ge=2, le=100)
    # Big galleries (docs/gallery.md). Exact search of 50k templates costs ~2 ms; above that
    # a faiss IVF index proposes candidates, re-scored exactly, so decisions see exact cosines.
    exact_max_templates: int = Field(50_000, ge=1_000, le=100_000_000)
    # Inverted lists per index: factor * sqrt(templates) (4000 lists at 1M).
    ann_lists_factor: float = Field(4.0, ge=0.5, le=64.0)
    # Lists scanned per probe: 64 of 4000 at 1M is ~16k codes, ~0.6 ms, recall@1 1.0 on the
    # synthetic benchmark where 16 already gives 0.99; the slack covers harder real data.
    ann_nprobe: int = Field(64, ge=1, le=4096)
    # Candidate templates re-ranked exactly; many times top_k so the runner-up subject that
    # the margin compares against is in the pool too.
    ann_pool: int = Field(64, ge=16, le=4096)
    # The index can miss the runner-up subject the margin is measured against (at 1M it did
    # for 13% of genuine probes, mostly replaced by one ~0.01 lower), which could turn
    # "ambiguous" into "match": an index match whose lead is below margin + this band is
    # searched again, deeper (about 4% of probes at 1M).
    ann_recheck_band: float = Field(0.05, ge=0.0, le=0.5)
    # Lists scanned and candidate templates of that deeper search (512 of 4000 lists at 1M,
    # ~5 ms; it runs for ~20% of probes). Also used below ``ann_deep_below``. 512 rather
    # than 256: recall@1 at 1M over probes down to the threshold 0.992 / 0.9965 (seeds 0 /
    # 1) against 0.9895 / 0.994, for search p99 5.8 ms against 3.8 (docs/gallery.md).
    ann_recheck_nprobe: int = Field(512, ge=1, le=65_536)
    ann_recheck_pool: int = Field(256, ge=16, le=65_536)
    # An index search whose best subject scores below this is repeated with the deeper
    # parameters, except from the threshold up to ``ann_decline_below``, where identify
    # declines a match anyway and a deeper search cannot change the outcome. A probe far
    # from its own templates lies where the IVF cell assignment is least reliable: at 1M
    # the exact best subject of probes at cosine 0.45-0.50 to their templates lay outside
    # the 64 lists nearest the probe for ~9% of them (recall@1 0.90-0.91), outside the 256
    # nearest for 2-4%; a best score below the threshold searched deeper is often found
    # (no_match becomes ambiguous: phone digits). From ``ann_decline_below`` to this the
    # deeper search is what finds a runner-up within the margin: every subject scoring
    # 0.52 or more lay within 142 lists.
    ann_deep_below: float = Field(0.65, ge=0.5, le=1.0)
    # An index match scoring below this is declined as ambiguous: the phone digits then
    # decide, exactly. A match needs no other subject within ``margin``; the index finds
    # a subject scoring 0.52 or more (all 392 such runners-up of 14,000 probes, 300k and 1M,
    # two seeds, lay within 142 of 4000 lists), but below that it reaches the gallery's
    # impostor tail (every probe's best impostor at 1M: 0.45 median, 0.54 p99, up to 0.59),
    # whose subjects lie in lists unrelated to the probe (at 0.40-0.52: 6-10% beyond the
    # 256 nearest, up to list 3,796). So an index match is trusted only from 0.52 + margin
    # (0.60) up; below, exact search (~100 ms at 1M) could vouch for it, the index cannot.
    # Declining is the safe side: a match on a missed runner-up skips the phone digits.
    # Raise it with the gallery's impostor tail (bench-gallery's impostor_best).
    ann_decline_below: float = Field(0.60, ge=0.5, le=0.95)
    # Retrain the centroids once the gallery has grown (or shrunk) by this factor.
    ann_rebuild_growth: float = Field(2.0, ge=1.1, le=16.0)
    # Codes kept in the index: "sq8" (1 byte/dim, exact re-rank makes its error harmless)
    # or "flat" (float32, 4x the memory).
    ann_codec: Literal["sq8", "flat"] = "sq8"

    @model_validator(mode="after")
    def _deep_covers_decline(self) -> MatchConfig:
        # Just above the decline floor only the deep search finds a runner-up in time.
        if self.ann_deep_below < self.ann_decline_below:
            raise ValueError("ann_deep_below must be at least ann_decline_below")
        return self


class PipelineConfig(_Strict):
    """Everything the pipeline needs; selected by name, bounded, immutable."""

    detector: DetectorConfig = DetectorConfig()
    embedder: EmbedderConfig = EmbedderConfig()
    liveness: LivenessConfig = LivenessConfig()
    quality: QualityConfig = QualityConfig()
    evidence: EvidenceConfig = EvidenceConfig()
    tracker: TrackerConfig = TrackerConfig()
    selection: SelectionConfig = SelectionConfig()
    match: MatchConfig = MatchConfig()
    intra_op_threads: int = Field(1, ge=1, le=64)
