"""Model manifest verification and ``facepay models verify|fetch`` against real weights.

The real model files come from ``FACEPAY_MODELS_DIR`` (default ``../shared/models`` next to
the checkout). A missing folder fails these tests; it never skips them. Network traffic goes
only to HTTP servers these tests start on 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ModelChecksumError, ModelMissingError
from pipeline.fetch import SIZE_SLACK
from pipeline.models import REPO_ROOT, ModelSpec, ModelStore, load_manifest, sha256_file
from stream_server.cli import main

MANIFEST = load_manifest()


@pytest.fixture(scope="module")
def real_models_dir() -> Path:
    """The shared folder of real weights; fail loudly when it is not there."""
    env = os.environ.get("FACEPAY_MODELS_DIR")
    folder = Path(env) if env else (REPO_ROOT.parent / "shared" / "models")
    if not folder.is_dir():
        pytest.fail(
            f"real model folder {folder} not found: set FACEPAY_MODELS_DIR to the folder "
            "holding the manifest's ONNX files (developers and CI: ../shared/models)"
        )
    return folder.resolve()


@pytest.fixture(autouse=True)
def _local_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy for the local test servers, and no mirror leaking in from the environment."""
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.delenv("FACEPAY_MODELS_MIRROR", raising=False)


def copy_models(src: Path, dest: Path) -> Path:
    """Copy the manifest's files (only) from ``src`` into ``dest``."""
    for spec in MANIFEST.values():
        target = dest / spec.file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / spec.file, target)
    return dest


def flip_byte(path: Path, offset: int = 1000) -> None:
    """Alter one byte of a file in place."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    """Run ``facepay`` in-process; return exit code, the JSON object on stdout, and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got {out!r}"
    return code, json.loads(lines[0]), err


def leftovers(folder: Path) -> list[Path]:
    """Temporary download files left anywhere under ``folder``."""
    return [p for p in folder.rglob("*") if p.is_file() and p.name.endswith(".part")]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static file server that counts requests and keeps the test output clean."""

    requests: list[str]

    def log_message(self, format: str, *args: object) -> None:
        """Silence the per-request log on stderr."""

    def do_GET(self) -> None:
        """Record the path, then serve the file."""
        self.requests.append(self.path)
        super().do_GET()


class _EndlessHandler(http.server.BaseHTTPRequestHandler):
    """A hostile server: no Content-Length and a body that never ends."""

    def log_message(self, format: str, *args: object) -> None:
        """Silence the per-request log on stderr."""

    def do_GET(self) -> None:
        """Stream zeros until the client hangs up."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        block = b"\0" * 65536
        try:
            while True:
                self.wfile.write(block)
        except OSError:
            pass


class LocalServer:
    """An HTTP server on 127.0.0.1 in a daemon thread."""

    def __init__(self, handler: Callable[..., http.server.BaseHTTPRequestHandler]) -> None:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class Mirror(LocalServer):
    """A static mirror of a folder that records the requested paths."""

    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        handler_cls = type("Handler", (_QuietHandler,), {"requests": self.requests})
        super().__init__(functools.partial(handler_cls, directory=str(folder)))


@pytest.fixture
def servers() -> Iterator[list[LocalServer]]:
    """Servers a test appends here are stopped at teardown."""
    started: list[LocalServer] = []
    yield started
    for server in started:
        server.close()


@pytest.fixture
def mirror_of(servers: list[LocalServer]) -> Callable[[Path], Mirror]:
    """Start a local mirror of a folder (stopped at teardown)."""

    def start(folder: Path) -> Mirror:
        mirror = Mirror(folder)
        servers.append(mirror)
        return mirror

    return start


def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- verify ---------------------------------------------------------------------------------


def test_manifest_lists_four_models() -> None:
    assert set(MANIFEST) == {"yunet", "mobilefacenet", "minifasnet_v2", "minifasnet_v1se"}
    for spec in MANIFEST.values():
        assert len(spec.sha256) == 64 and spec.size > 0 and spec.urls


def test_verify_passes_on_real_models(
    real_models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _err = run_cli(capsys, "models", "verify", "--models-dir", str(real_models_dir))
    assert code == 0
    assert out["ok"] is True
    assert out["models_dir"] == str(real_models_dir)
    rows = out["models"]
    assert isinstance(rows, list) and len(rows) == len(MANIFEST)
    assert all(row["ok"] and row["found"] == row["expected"] for row in rows)
    store = ModelStore(real_models_dir)
    for name, spec in MANIFEST.items():
        assert store.path(name) == real_models_dir / spec.file


def test_verify_reads_models_dir_from_env(
    real_models_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FACEPAY_MODELS_DIR", str(real_models_dir))
    code, out, _err = run_cli(capsys, "models", "verify")
    assert code == 0 and out["models_dir"] == str(real_models_dir)


def test_verify_refuses_altered_file(
    real_models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = copy_models(real_models_dir, tmp_path / "models")
    spec = MANIFEST["mobilefacenet"]
    flip_byte(folder / spec.file)
    found = sha256_file(folder / spec.file)
    assert found != spec.sha256

    code, out, err = run_cli(capsys, "models", "verify", "--models-dir", str(folder))
    assert code == 1
    assert out["ok"] is False
    bad = [row for row in out["models"] if not row["ok"]]
    assert [row["file"] for row in bad] == [spec.file]
    assert bad[0]["expected"] == spec.sha256 and bad[0]["found"] == found
    assert spec.file in err and spec.sha256 in err and found in err

    store = ModelStore(folder)
    with pytest.raises(ModelChecksumError) as excinfo:
        store.path("mobilefacenet")
    assert spec.sha256 in str(excinfo.value) and found in str(excinfo.value)
    assert store.path("yunet") == folder / MANIFEST["yunet"].file


def test_missing_file_raises_model_missing(
    real_models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = copy_models(real_models_dir, tmp_path / "models")
    spec = MANIFEST["minifasnet_v1se"]
    (folder / spec.file).unlink()
    with pytest.raises(ModelMissingError, match=spec.file):
        ModelStore(folder).path("minifasnet_v1se")

    code, out, err = run_cli(capsys, "models", "verify", "--models-dir", str(folder))
    assert code == 1 and out["ok"] is False
    assert spec.file in err and spec.sha256 in err


# --- fetch ----------------------------------------------------------------------------------


def test_fetch_downloads_all_from_mirror(
    real_models_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mirror_of: Callable[[Path], Mirror],
) -> None:
    mirror = mirror_of(real_models_dir)
    dest = tmp_path / "fetched"
    code, out, _err = run_cli(
        capsys, "models", "fetch", "--dest", str(dest), "--mirror", mirror.url
    )
    assert code == 0, out
    assert out["dest"] == str(dest)
    rows = out["models"]
    assert isinstance(rows, list) and len(rows) == len(MANIFEST)
    for row in rows:
        assert row["status"] == "downloaded"
        assert row["source"].startswith(mirror.url + "/")
        assert "error" not in row
    assert leftovers(dest) == []

    code, out, _err = run_cli(capsys, "models", "verify", "--models-dir", str(dest))
    assert code == 0 and out["ok"] is True


def test_fetch_reads_mirror_from_env(
    real_models_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    mirror_of: Callable[[Path], Mirror],
) -> None:
    mirror = mirror_of(real_models_dir)
    monkeypatch.setenv("FACEPAY_MODELS_MIRROR", mirror.url)
    code, _out, _err = run_cli(capsys, "models", "fetch", "--dest", str(tmp_path / "m"))
    assert code == 0
    assert len(mirror.requests) == len(MANIFEST)


def test_fetch_refuses_altered_file(
    real_models_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mirror_of: Callable[[Path], Mirror],
) -> None:
    served = copy_models(real_models_dir, tmp_path / "served")
    spec = MANIFEST["yunet"]
    flip_byte(served / spec.file)
    found = sha256_file(served / spec.file)
    mirror = mirror_of(served)
    dest = tmp_path / "fetched"

    code, out, err = run_cli(capsys, "models", "fetch", "--dest", str(dest), "--mirror", mirror.url)
    assert code == 1
    status = {row["file"]: row for row in out["models"]}
    assert status[spec.file]["status"] == "failed"
    assert spec.sha256 in status[spec.file]["error"] and found in status[spec.file]["error"]
    assert spec.file in err and spec.sha256 in err and found in err
    others = [f for f in status if f != spec.file]
    assert all(status[f]["status"] == "downloaded" for f in others)

    assert not (dest / spec.file).exists()
    assert leftovers(dest) == []
    assert not any(p.name.startswith(".") for p in dest.rglob("*")), list(dest.rglob("*"))


def test_fetch_present_models_downloads_nothing(
    real_models_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mirror_of: Callable[[Path], Mirror],
) -> None:
    dest = copy_models(real_models_dir, tmp_path / "models")
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*.onnx")}
    mirror = mirror_of(real_models_dir)

    code, out, _err = run_cli(
        capsys, "models", "fetch", "--dest", str(dest), "--mirror", mirror.url
    )
    assert code == 0
    assert [row["status"] for row in out["models"]] == ["present"] * len(MANIFEST)
    assert mirror.requests == []
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*.onnx")} == before


def test_fetch_replaces_only_the_altered_local_file(
    real_models_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mirror_of: Callable[[Path], Mirror],
) -> None:
    dest = copy_models(real_models_dir, tmp_path / "models")
    spec = MANIFEST["minifasnet_v2"]
    flip_byte(dest / spec.file)
    mirror = mirror_of(real_models_dir)

    code, out, _err = run_cli(
        capsys, "models", "fetch", "--dest", str(dest), "--mirror", mirror.url
    )
    assert code == 0
    status = {row["file"]: row["status"] for row in out["models"]}
    assert status.pop(spec.file) == "downloaded"
    assert set(status.values()) == {"present"}
    assert mirror.requests == ["/" + spec.file]
    assert sha256_file(dest / spec.file) == spec.sha256


def test_fetch_closed_port_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "fetched"
    mirror = f"http://127.0.0.1:{closed_port()}"
    code, out, err = run_cli(
        capsys, "models", "fetch", "--dest", str(dest), "--mirror", mirror, "--timeout", "5"
    )
    assert code == 2
    assert all(row["status"] == "failed" for row in out["models"])
    assert "connection" in err
    assert leftovers(dest) == [] and not any(dest.rglob("*.onnx"))


def test_fetch_stops_an_endless_body(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], servers: list[LocalServer]
) -> None:
    dest = tmp_path / "fetched"
    hostile = LocalServer(_EndlessHandler)
    servers.append(hostile)
    code, out, err = run_cli(
        capsys, "models", "fetch", "--dest", str(dest), "--mirror", hostile.url, "--timeout", "5"
    )
    assert code == 1
    for row in out["models"]:
        assert row["status"] == "failed" and "exceeds" in row["error"]
    assert leftovers(dest) == [] and not any(dest.rglob("*.onnx"))
    biggest: ModelSpec = max(MANIFEST.values(), key=lambda s: s.size)
    assert str(biggest.size) in err and str(SIZE_SLACK) in err


def test_fetch_rejects_non_http_mirror(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        capsys, "models", "fetch", "--dest", str(tmp_path), "--mirror", "file:///etc"
    )
    assert code == 2 and out["error"] == "bad_mirror" and "http" in err


def test_fetch_http_404_is_refused_not_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mirror_of: Callable[[Path], Mirror]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    mirror = mirror_of(empty)
    dest = tmp_path / "fetched"
    code, out, err = run_cli(capsys, "models", "fetch", "--dest", str(dest), "--mirror", mirror.url)
    assert code == 1
    assert all("HTTP 404" in row["error"] for row in out["models"])
    assert "404" in err and leftovers(dest) == []


def test_timed_session_reports_the_cpu_time_of_each_run_to_the_clock():
    import time

    from pipeline.models import ModelClock, TimedSession

    class Busy:
        def run(self, output_names, input_feed):
            end = time.thread_time() + 0.02
            while time.thread_time() < end:  # burn CPU like an inference would
                pass
            return [input_feed["x"]]

        def get_inputs(self):
            return ["in"]

        def get_outputs(self):
            return ["out"]

    clock = ModelClock()
    session = TimedSession(Busy(), "busy", clock)  # type: ignore[arg-type]
    assert session.run(None, {"x": 1}) == [1]
    session.run(None, {"x": 2})
    seconds, runs = clock.snapshot()["busy"]
    assert runs == 2 and 0.04 <= seconds < 1.0
    assert session.get_inputs() == ["in"] and session.get_outputs() == ["out"]


def test_model_store_times_sessions_only_when_given_a_clock(models_dir):
    import numpy as np

    from pipeline.models import ModelClock, ModelStore, TimedSession

    assert not isinstance(ModelStore(models_dir).session("mobilefacenet"), TimedSession)
    clock = ModelClock()
    session = ModelStore(models_dir, clock=clock).session("mobilefacenet")
    assert isinstance(session, TimedSession)
    feed = {session.get_inputs()[0].name: np.zeros((1, 3, 112, 112), np.float32)}
    session.run(None, feed)
    assert clock.snapshot()["mobilefacenet"][1] == 1
