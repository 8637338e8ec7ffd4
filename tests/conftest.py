"""Shared fixtures: the real models and photos from ../shared, located by environment.

In CI these must exist. A test that needs them and cannot find them fails with a message
saying where it looked; nothing is skipped silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.analyzer import FaceAnalyzer
from pipeline.config import PipelineConfig
from pipeline.image import load_image
from pipeline.models import ModelStore
from pipeline.types import ImageArray

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHARED = REPO_ROOT.parent / "shared"


def _locate(env: str, default: Path, probe: str) -> Path:
    path = Path(os.environ.get(env) or default)
    if not (path / probe).exists():
        pytest.fail(
            f"{env} is not set to a folder holding {probe!r} (looked in {path}); "
            f"point it at ../shared/{default.name}",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The real model folder (FACEPAY_MODELS_DIR, default ../shared/models)."""
    return _locate("FACEPAY_MODELS_DIR", DEFAULT_SHARED / "models", "detection")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real test photos (FACEPAY_TEST_DATA, default ../shared/data)."""
    return _locate("FACEPAY_TEST_DATA", DEFAULT_SHARED / "data", "faces")


@pytest.fixture(scope="session")
def store(models_dir: Path) -> ModelStore:
    """Verified models."""
    return ModelStore(models_dir)


@pytest.fixture(scope="session")
def analyzer(store: ModelStore) -> FaceAnalyzer:
    """The default pipeline on the real models (shared: stages hold no per-call state)."""
    return FaceAnalyzer.from_config(PipelineConfig(), store)


@pytest.fixture(scope="session")
def photo(data_dir: Path):  # type: ignore[no-untyped-def]
    """Load a shared photo by its path under the data folder (cached)."""
    cache: dict[str, ImageArray] = {}

    def load(rel: str) -> ImageArray:
        if rel not in cache:
            cache[rel] = load_image(data_dir / rel)
        return cache[rel]

    return load
