"""``facepay analyze``, ``eval``, ``bench-pipeline`` and ``models verify``, run in-process.

Every command writes JSON lines on stdout and human messages on stderr; these tests parse
stdout through capsys and check exit codes against the contract (0 ok, 1 refused, 2 usage).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import pytest

from stream_server.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[Any], str]:
    """(exit code, JSON objects from stdout, stderr) of one in-process ``facepay`` run."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    return code, lines, err


def _link(target: Path, link: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


# --- analyze ---------------------------------------------------------------------------------


def test_analyze_compares_faces(
    capsys: pytest.CaptureFixture[str], models_dir: Path, data_dir: Path
) -> None:
    obama = data_dir / "faces/obama/obama.jpg"
    obama2 = data_dir / "faces/obama/obama2.jpg"
    biden = data_dir / "faces/biden/biden.jpg"
    code, lines, err = run(
        capsys, "analyze", "--models-dir", str(models_dir), str(obama), str(obama2), str(biden)
    )
    assert code == 0, err
    images, similarity = lines[:3], lines[3]
    assert [line["image"] for line in images] == [str(obama), str(obama2), str(biden)]
    for line in images:
        assert len(line["faces"]) == 1, line
        face = line["faces"][0]
        assert face["quality"]["ok"] is True
        assert 0.0 <= face["p_real"] <= 1.0
        assert isinstance(face["live"], bool)
        assert len(face["box"]) == 4 and len(face["landmarks"]) == 5
    assert images[0]["size"] == [910, 1137]
    verdict = {(p["a"], p["b"]): p for p in similarity["similarity"]}
    assert len(verdict) == 3
    assert verdict[(str(obama), str(obama2))]["same_person"] is True
    assert verdict[(str(obama), str(biden))]["same_person"] is False
    assert verdict[(str(obama2), str(biden))]["same_person"] is False
    threshold = similarity["threshold"]
    assert verdict[(str(obama), str(obama2))]["cosine"] >= threshold
    assert verdict[(str(obama), str(biden))]["cosine"] < threshold


def test_analyze_flags_an_upside_down_face_and_compares_it_with_nobody(
    capsys: pytest.CaptureFixture[str], models_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    obama = data_dir / "faces/obama/obama.jpg"
    turned = tmp_path / "turned.png"
    cv2.imwrite(str(turned), cv2.rotate(cv2.imread(str(obama)), cv2.ROTATE_180))
    code, lines, err = run(
        capsys, "analyze", "--models-dir", str(models_dir), str(obama), str(turned)
    )
    assert code == 0, err
    upright, upside = lines[0]["faces"], lines[1]["faces"]
    assert [f["upside_down"] for f in upright] == [False]
    assert upside and all(f["upside_down"] for f in upside), upside
    # Only one usable face is left, so there is no pair to compare (and no false "match").
    assert len(lines) == 2, lines


def test_analyze_single_image_emits_no_similarity(
    capsys: pytest.CaptureFixture[str], models_dir: Path, data_dir: Path
) -> None:
    path = data_dir / "faces/group/obama_and_biden.jpg"
    code, lines, err = run(capsys, "analyze", "--models-dir", str(models_dir), str(path))
    assert code == 0, err
    assert len(lines) == 1
    assert len(lines[0]["faces"]) >= 2


@pytest.mark.parametrize(
    "content",
    [b"\xff\xd8\xff\xe0 not a jpeg at all" * 4, b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 32],
    ids=["corrupt", "empty", "bad_png"],
)
def test_analyze_bad_image_is_refused(
    capsys: pytest.CaptureFixture[str], models_dir: Path, tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    code, lines, err = run(capsys, "analyze", "--models-dir", str(models_dir), str(path))
    assert code == 1
    assert lines == [{"error": "bad_image", "message": lines[0]["message"]}]
    assert str(path) in lines[0]["message"]
    assert "Traceback" not in err
    assert str(path) in err


def test_analyze_missing_image_is_refused(
    capsys: pytest.CaptureFixture[str], models_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "absent.jpg"
    code, lines, err = run(capsys, "analyze", "--models-dir", str(models_dir), str(path))
    assert code == 1
    assert lines[-1]["error"] == "bad_image"
    assert str(path) in lines[-1]["message"]
    assert "Traceback" not in err


# --- eval ------------------------------------------------------------------------------------


def test_eval_faces_and_liveness(
    capsys: pytest.CaptureFixture[str], models_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    spoof = tmp_path / "spoof"
    live = tmp_path / "live"
    for name in ("image_F1.jpg", "image_F2.jpg"):
        _link(data_dir / "spoof" / name, spoof / name)
    _link(data_dir / "spoof/image_T1.jpg", live / "image_T1.jpg")
    plot = tmp_path / "eval.png"
    code, lines, err = run(
        capsys,
        "eval",
        "--models-dir",
        str(models_dir),
        str(data_dir / "faces"),
        "--spoof",
        str(spoof),
        "--live",
        str(live),
        "--plot",
        str(plot),
    )
    assert code == 0, err
    assert len(lines) == 1
    out = lines[0]
    for key in ("pairs", "eer", "threshold", "far", "frr", "tar_at_far"):
        assert key in out, key
    for key in ("apcer", "bpcer", "liveness_threshold"):
        assert key in out, key
    assert set(out["pairs"]) == {"genuine", "impostor"}
    assert set(out["tar_at_far"]) == {"1e-2", "1e-3"}
    # obama 4, biden 2, kit 3 single-face photos: 6 + 1 + 3 genuine pairs, the rest impostor.
    assert out["pairs"] == {"genuine": 10, "impostor": 26}
    assert out["identities"] == 3
    assert out["separated"] is True
    assert out["far"] == 0 and out["frr"] == 0
    assert out["eer"] == 0
    # Too few impostor pairs to measure TAR at 1% or 0.1% FAR.
    assert out["tar_at_far"] == {"1e-2": None, "1e-3": None}
    assert out["skipped"] == {"several_faces": 2}
    assert out["images"] == {"total": 11, "used": 9}
    assert out["apcer"] == 0 and out["bpcer"] == 0
    assert 0 < out["liveness_threshold"] < 1
    assert out["presentations"] == {"live": 1, "spoof": 2}
    assert out["pad_separated"] is True
    assert out["plot"] == str(plot)
    assert plot.read_bytes()[:8] == PNG_SIGNATURE


def _lfw_tree(data_dir: Path, root: Path) -> None:
    """Obama_0001..3, Biden_0001..2, Kit_0001..3 as LFW-named symlinks to the shared photos."""
    faces = data_dir / "faces"
    sources = {
        "Obama": [faces / "obama" / n for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")],
        "Biden": [faces / "biden" / n for n in ("biden.jpg", "biden2.jpg")],
        "Kit": [
            faces / "kit_harington" / n for n in ("john1.jpeg", "john2.jpeg", "johnsnow_test1.jpg")
        ],
    }
    for name, paths in sources.items():
        for n, src in enumerate(paths, start=1):
            _link(src, root / name / f"{name}_{n:04d}.jpg")


PAIRS = """10
Obama 1 2
Obama 1 3
Obama 2 3
Biden 1 2
Kit 1 2
Kit 2 3
Obama 1 Biden 1
Obama 2 Kit 3
Biden 2 Kit 1
Kit 2 Obama 3
"""


def test_eval_pairs_protocol(
    capsys: pytest.CaptureFixture[str], models_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "lfw"
    _lfw_tree(data_dir, root)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(PAIRS, encoding="utf-8")
    code, lines, err = run(
        capsys, "eval", "--models-dir", str(models_dir), str(root), "--pairs", str(pairs)
    )
    assert code == 0, err
    out = lines[0]
    assert out["face_select"] == "central"
    assert out["images"] == {"total": 8, "used": 8}
    proto = out["protocol"]
    assert proto["pairs"] == {"genuine": 6, "impostor": 4}
    assert proto["failed_to_acquire"] == 0
    assert proto["separated"] is True
    assert proto["far"] == 0 and proto["frr"] == 0
    assert proto["accuracy_at_eer_threshold"] == 1.0
    assert proto["pairs_file"] == str(pairs)
    # The folder-wide pairs: 3+1+3 genuine out of C(8, 2) = 28.
    assert out["pairs"] == {"genuine": 7, "impostor": 21}


def test_eval_pairs_missing_image_counts_as_failure(
    capsys: pytest.CaptureFixture[str], models_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "lfw"
    faces = data_dir / "faces"
    _link(faces / "obama/obama.jpg", root / "Obama/Obama_0001.jpg")
    _link(faces / "obama/obama2.jpg", root / "Obama/Obama_0002.jpg")
    _link(faces / "biden/biden.jpg", root / "Biden/Biden_0001.jpg")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("Obama 1 2\nObama 1 9\nObama 2 Biden 1\n", encoding="utf-8")
    code, lines, err = run(
        capsys, "eval", "--models-dir", str(models_dir), str(root), "--pairs", str(pairs)
    )
    assert code == 0, err
    proto = lines[0]["protocol"]
    assert proto["pairs"] == {"genuine": 2, "impostor": 1}
    assert proto["failed_to_acquire"] == 1
    # A failure to acquire scores as the lowest possible match, so it is a false reject.
    assert proto["frr"] == 0.5
    assert lines[0]["skipped"] == {"bad_image": 1}


@pytest.mark.parametrize(
    "text",
    ["Obama 1\n", "Obama 1 2 Biden 1 5\n", "Obama one 2\n", "10\nObama 1 2\nBiden\n"],
    ids=["two_fields", "five_fields", "not_a_number", "bad_later_line"],
)
def test_eval_malformed_pairs_file_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
    models_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    text: str,
) -> None:
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(text, encoding="utf-8")
    err = _eval_usage_error(capsys, models_dir, data_dir / "faces", "--pairs", pairs)
    assert "pairs" in err


def _eval_usage_error(capsys: pytest.CaptureFixture[str], models_dir: Path, *args: Any) -> str:
    """Run ``facepay eval`` expecting a usage error (exit 2, nothing on stdout); its stderr."""
    code, lines, err = run(capsys, "eval", "--models-dir", str(models_dir), *map(str, args))
    assert code == 2, err
    assert lines == []
    return err


# Each case: eval's arguments, made from (data folder, tmp folder), and what stderr must name.
EVAL_USAGE_ERRORS: dict[str, tuple[Any, str]] = {
    "missing_pairs_file": (lambda d, t: [d / "faces", "--pairs", t / "absent.txt"], "pairs"),
    "spoof_without_live": (lambda d, t: [d / "faces", "--spoof", d / "spoof"], "--live"),
    "live_without_spoof": (lambda d, t: [d / "faces", "--live", d / "spoof"], "--spoof"),
    "missing_faces_dir": (lambda d, t: [t / "no_such_folder"], "no_such_folder"),
    "missing_spoof_dir": (
        lambda d, t: [d / "faces", "--spoof", t / "nope", "--live", d / "spoof"],
        "nope",
    ),
}


@pytest.mark.parametrize("case", list(EVAL_USAGE_ERRORS))
def test_eval_usage_errors_say_what_is_wrong(
    capsys: pytest.CaptureFixture[str],
    models_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    case: str,
) -> None:
    make_args, named = EVAL_USAGE_ERRORS[case]
    err = _eval_usage_error(capsys, models_dir, *make_args(data_dir, tmp_path))
    assert named in err


# --- bench-pipeline --------------------------------------------------------------------------


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def test_bench_pipeline(
    capsys: pytest.CaptureFixture[str], models_dir: Path, data_dir: Path
) -> None:
    image = data_dir / "faces/obama/obama.jpg"
    code, lines, err = run(
        capsys,
        "bench-pipeline",
        "--models-dir",
        str(models_dir),
        "--image",
        str(image),
        "--iterations",
        "3",
        "--frames",
        "3",
    )
    assert code == 0, err
    assert len(lines) == 1
    out = lines[0]
    for stage in ("detect", "align", "embed", "liveness"):
        assert _positive(out["stages_ms"][stage]), (stage, out["stages_ms"])
    for key in ("frame_ms", "model_ms", "overhead_ratio"):
        assert _positive(out[key]), (key, out[key])
    assert {"1", "2"} <= set(out["fps"])
    assert all(_positive(out["fps"][k]) for k in ("1", "2")), out["fps"]
    assert out["faces"] >= 1
    assert out["image"] == str(image)


@pytest.mark.parametrize("flag", ["--iterations", "--frames"])
def test_bench_pipeline_too_few_runs_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], models_dir: Path, data_dir: Path, flag: str
) -> None:
    image = data_dir / "faces/obama/obama.jpg"
    code, _, _ = run(
        capsys,
        "bench-pipeline",
        "--models-dir",
        str(models_dir),
        "--image",
        str(image),
        flag,
        "2",
    )
    assert code == 2


def test_bench_pipeline_bad_image_is_refused(
    capsys: pytest.CaptureFixture[str], models_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    code, lines, err = run(
        capsys, "bench-pipeline", "--models-dir", str(models_dir), "--image", str(bad)
    )
    assert code == 1
    assert lines[-1]["error"] == "bad_image"
    assert "Traceback" not in err


# --- models verify ---------------------------------------------------------------------------


def test_models_verify_empty_dir_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    code, lines, err = run(capsys, "models", "verify", "--models-dir", str(empty))
    assert code == 1
    assert lines[-1]["ok"] is False
    assert lines[-1]["models"] and not any(row["ok"] for row in lines[-1]["models"])
    assert "missing" in err


def test_models_verify_real_models(capsys: pytest.CaptureFixture[str], models_dir: Path) -> None:
    code, lines, err = run(capsys, "models", "verify", "--models-dir", str(models_dir))
    assert code == 0, err
    assert lines[-1]["ok"] is True


def test_analyze_with_empty_models_dir_is_refused(
    capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    code, lines, err = run(
        capsys,
        "analyze",
        "--models-dir",
        str(empty),
        str(data_dir / "faces/obama/obama.jpg"),
    )
    assert code == 1
    assert lines[-1]["error"].startswith("model")
    assert "Traceback" not in err
