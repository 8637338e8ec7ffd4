"""Rules of the code base that a reviewer would otherwise check by hand."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.config import PipelineConfig
from session.config import FacePayConfig

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_PIPELINE = {"asyncio", "aiohttp", "aiortc", "redis", "av", "session", "stream_server"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "pipeline").glob("*.py")), ids=lambda p: p.name)
def test_pipeline_is_pure(path):
    bad = _imports(path) & FORBIDDEN_IN_PIPELINE
    assert not bad, f"{path.name} imports {bad}: pipeline/ must stay numpy/OpenCV/onnxruntime"


def test_config_refuses_unknown_keys():
    with pytest.raises(ValidationError):
        PipelineConfig.model_validate({"liveness": {"treshold": 0.5}})


@pytest.mark.parametrize(
    "bad",
    [
        {"liveness": {"threshold": 0.0}},
        {"match": {"threshold": -1}},
        {"match": {"margin": 0.9}},
        {"evidence": {"min_frames": 1}},
        {"detector": {"name": "haar"}},
        # Values that would quietly turn a check off (each refused since 2026-11-25):
        {"match": {"margin": 0.0}},  # one of two identical twins picked, not ambiguous
        {"match": {"threshold": 0.2}},  # below LFW's equal-error point
        {"evidence": {"min_span_s": 0.0}},  # two frames of one moment as "video"
        {"evidence": {"spoof_min_frames": 300, "max_frames": 60}},  # spoof never callable
        {"tracker": {"embedding_threshold": -1.0}},  # any two faces share a track
        {"tracker": {"embedding_threshold": 0.7, "relink_threshold": 0.6}},
    ],
)
def test_config_refuses_out_of_bounds_values(bad):
    with pytest.raises(ValidationError):
        PipelineConfig.model_validate(bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"server": {"host": ""}},  # listens on every interface
        {"policy": {"gate_fare": 500, "gate_limit": 400}},  # every walker denied "limit"
    ],
)
def test_server_config_refuses_values_that_open_or_close_everything(bad):
    with pytest.raises(ValidationError):
        FacePayConfig.model_validate(bad)
    FacePayConfig.model_validate({"server": {"host": "0.0.0.0"}})
    FacePayConfig.model_validate({"policy": {"gate_fare": 400, "gate_limit": 400}})


def test_config_is_immutable():
    cfg = PipelineConfig()
    with pytest.raises(ValidationError):
        cfg.match.threshold = 0.1  # type: ignore[misc]


def test_camera_caps_by_terminal_mode():
    """Checkout and enroll terminals are capped from their own sections (bounded, or null
    for none); a gate's camera is paced by its session, never capped at the answer."""
    assert {m: FacePayConfig().camera_cap(m) for m in ("checkout", "enroll", "gate")} == {
        "checkout": 15.0,
        "enroll": 15.0,
        "gate": None,
    }
    cfg = FacePayConfig.model_validate({"checkout": {"camera_fps": None}, "enrollment": {}})
    assert cfg.camera_cap("checkout") is None and cfg.camera_cap("enroll") == 15.0
    for bad in (4.0, 61.0):
        with pytest.raises(ValidationError):
            FacePayConfig.model_validate({"enrollment": {"camera_fps": bad}})
