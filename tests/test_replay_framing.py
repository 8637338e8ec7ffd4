"""``facepay replay`` frames the face of a photo, as a camera in front of the shopper would."""

from __future__ import annotations

import itertools
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from pipeline.analyzer import FaceAnalyzer
from stream_server import replay
from stream_server.cli_replay import _face_locator
from stream_server.replay_source import Locate, ReplayTrack, _upright

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


# --- videos: display rotation and framing ---------------------------------------------------


def _phone_video(data_dir: Path, path: Path, rotation: int, locate: Locate) -> Path:
    """A portrait 'phone' clip (360x640 upright, face in the top third) stored sideways.

    Phones record portrait video as landscape frames plus a display rotation; ``rotation``
    is FFmpeg's (counter-clockwise degrees), so -90 means "turn 90 degrees clockwise".
    """
    photo = data_dir / "faces" / "obama" / "obama.jpg"
    camera = list(replay.open_source(photo, fps=15, seconds=1, locate=locate))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=15)
        stream.width, stream.height = 640, 360
        stream.pix_fmt = "yuv420p"
        stream.set_display_rotation(rotation)
        for frame in camera:
            upright = np.full((640, 360, 3), 90, np.uint8)  # a plain wall below the face
            upright[:270] = cv2.resize(frame, (360, 270), interpolation=cv2.INTER_AREA)
            sideways = cv2.rotate(upright, cv2.ROTATE_90_COUNTERCLOCKWISE)
            for packet in stream.encode(av.VideoFrame.from_ndarray(sideways, format="bgr24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _upright_faces(analyzer: FaceAnalyzer, frames: list[np.ndarray]) -> list[bool]:
    """Per frame: a face is found and it is upright (eyes above the mouth)."""
    found = []
    for frame in frames:
        faces = analyzer.detect(frame)
        if not faces:
            found.append(False)
            continue
        points = max(faces, key=lambda f: f.box.area).landmarks_array()
        eyes, mouth = points[[0, 1]], points[[3, 4]]
        found.append(bool(eyes[:, 1].max() < mouth[:, 1].min()))
    return found


def test_a_phone_video_is_turned_upright_and_framed_on_the_face(
    data_dir: Path, analyzer: FaceAnalyzer, models_dir: Path, tmp_path: Path
) -> None:
    locate = _face_locator(str(models_dir))
    assert locate is not None
    video = _phone_video(data_dir, tmp_path / "phone.mp4", -90, locate)
    with av.open(str(video)) as container:
        first = next(container.decode(video=0))
        assert (first.width, first.height, first.rotation) == (640, 360, -90)
    frames = list(replay.open_source(video, fps=15, seconds=1.0, locate=locate))
    assert len(frames) == 15 and all(f.shape == (480, 640, 3) for f in frames)
    assert all(_upright_faces(analyzer, frames))
    # Without a locator the middle of the portrait is streamed: the wall, no face.
    centred = list(replay.open_source(video, fps=15, seconds=1.0))
    assert not any(_upright_faces(analyzer, centred))


@pytest.mark.parametrize(
    ("rotation", "turn"),
    [
        (0, None),
        (-90, cv2.ROTATE_90_CLOCKWISE),
        (90, cv2.ROTATE_90_COUNTERCLOCKWISE),
        (180, cv2.ROTATE_180),
        (-180, cv2.ROTATE_180),
    ],
)
def test_display_rotation_is_undone_as_ffmpeg_plays_it(rotation: int, turn: int | None) -> None:
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    expected = image if turn is None else cv2.rotate(image, turn)
    assert np.array_equal(_upright(image, rotation), expected)


@pytest.mark.parametrize(
    ("fps", "cap", "kept"),
    [(30.0, 15.0, 15), (25.0, 15.0, 15), (24.0, 15.0, 15), (30.0, 10.0, 10), (15.0, 15.0, 15)],
)
def test_a_capped_replay_sends_the_rate_asked_on_average(fps: float, cap: float, kept: int) -> None:
    """``max_fps`` caps the frames sent as a browser's ``maxFramerate`` does: they average
    the cap (15 of every 25 of a 25 fps video, not every second one), never more, with no
    gap as long as two intervals of the cap."""
    track = ReplayTrack([], fps=fps)
    track.set_max_fps(cap)
    times = [round(i * 90_000 / fps) / 90_000 for i in range(int(fps * 10))]
    sent = [t for t in times if track._keeps(t)]
    assert len(sent) == kept * 10
    assert all(b - a < 2.0 / cap for a, b in itertools.pairwise(sent))
    track.set_max_fps(None)
    assert all(track._keeps(t) for t in times)
