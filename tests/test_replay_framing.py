"""``facepay replay`` frames the face of a photo, as a camera in front of the shopper would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.analyzer import FaceAnalyzer
from stream_server import replay
from stream_server.cli_replay import _face_locator

# A full-length portrait (970x2204): the centre of its 4:3 crop is the chest.
PORTRAIT = Path("faces") / "biden" / "biden.jpg"


def _found(analyzer: FaceAnalyzer, frames: list[np.ndarray]) -> list[bool]:
    return [bool(analyzer.detect(f)) for f in frames]


def test_a_tall_portrait_is_framed_on_its_face(
    data_dir: Path, analyzer: FaceAnalyzer, models_dir: Path
) -> None:
    locate = _face_locator(str(models_dir))
    assert locate is not None
    centred = list(replay.open_source(data_dir / PORTRAIT, fps=5, seconds=1.0))
    framed = list(replay.open_source(data_dir / PORTRAIT, fps=5, seconds=1.0, locate=locate))
    assert not any(_found(analyzer, centred))  # what replay streamed before it located faces
    assert all(_found(analyzer, framed))


def test_an_explicit_focus_wins_over_the_locator(data_dir: Path, analyzer: FaceAnalyzer) -> None:
    calls: list[int] = []

    def locate(image: np.ndarray) -> tuple[float, float, float, float] | None:
        calls.append(1)
        return None

    frames = list(
        replay.open_source(
            data_dir / PORTRAIT,
            fps=5,
            seconds=1.0,
            focus=(0.0, 1500.0, 970.0, 2204.0),
            locate=locate,
        )
    )
    assert calls == []
    assert not any(_found(analyzer, frames))  # the legs, as asked


def test_folder_photos_are_framed_too(
    data_dir: Path, analyzer: FaceAnalyzer, models_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "a.jpg").write_bytes((data_dir / PORTRAIT).read_bytes())
    locate = _face_locator(str(models_dir))
    frames = list(replay.open_source(tmp_path, fps=5, seconds=1.0, locate=locate))
    assert frames and all(_found(analyzer, frames))


def test_without_models_photos_are_centred_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _face_locator(str(tmp_path / "no-models")) is None
    err = capsys.readouterr().err
    assert "centred" in err and "--focus" in err
