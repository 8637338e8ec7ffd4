"""Model manifest, sha256 verification and onnxruntime session creation.

Weights are never committed. They are found in a models folder (``--models-dir``,
``FACEPAY_MODELS_DIR``, default ``models/`` in the checkout) and every file is checked
against the manifest's sha256 before a session is built from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from pipeline.errors import ModelChecksumError, ModelError, ModelMissingError

#: The checkout root: ``models/manifest.json`` lives beside the packages.
REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST_PATH = REPO_ROOT / "models" / "manifest.json"
DEFAULT_MODELS_DIR = REPO_ROOT / "models"
MODELS_DIR_ENV = "FACEPAY_MODELS_DIR"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One manifest entry."""

    name: str
    role: str
    file: str
    sha256: str
    size: int
    licence: str
    urls: tuple[str, ...]


def load_manifest(path: Path = MANIFEST_PATH) -> dict[str, ModelSpec]:
    """Read the manifest: model name -> spec."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read model manifest {path}: {exc}") from exc
    specs: dict[str, ModelSpec] = {}
    for name, entry in raw["models"].items():
        specs[name] = ModelSpec(
            name=name,
            role=entry["role"],
            file=entry["file"],
            sha256=entry["sha256"],
            size=int(entry["size"]),
            licence=entry["licence"],
            urls=tuple(entry["urls"]),
        )
    return specs


def resolve_models_dir(models_dir: str | os.PathLike[str] | None = None) -> Path:
    """The models folder: explicit argument, else ``FACEPAY_MODELS_DIR``, else ``models/``."""
    if models_dir:
        return Path(models_dir)
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env) if env else DEFAULT_MODELS_DIR


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_model(models_dir: Path, spec: ModelSpec) -> Path:
    """Return the model's path if present with the manifest's sha256, else raise."""
    path = models_dir / spec.file
    if not path.is_file():
        raise ModelMissingError(
            f"model file {spec.file} is missing from {models_dir} "
            f"(expected sha256 {spec.sha256}); set FACEPAY_MODELS_DIR or run "
            "`facepay models fetch`"
        )
    found = sha256_file(path)
    if found != spec.sha256:
        raise ModelChecksumError(
            f"model file {spec.file} in {models_dir} is altered: "
            f"expected sha256 {spec.sha256}, found {found}"
        )
    return path


def make_session(
    path: Path, intra_op_threads: int = 1, allow_spinning: bool = False
) -> ort.InferenceSession:
    """An onnxruntime CPU session: 1 intra-op thread and no busy-wait spinning by default.

    Several sessions spinning on 2 cores made the pipeline 3-4x slower here, so both are off
    unless a caller asks otherwise.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if allow_spinning else "0")
    try:
        return ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own opaque exception types
        raise ModelError(f"cannot load model {path}: {exc}") from exc


class ModelClock:
    """CPU time spent inside ``session.run`` per model, summed over every thread.

    This is the "raw model inference" the benchmarks compare the server's CPU time with: only
    the onnxruntime call, none of the pre/post-processing around it. Sessions run with one
    intra-op thread, which onnxruntime runs on the calling thread, so the calling thread's CPU
    time (``time.thread_time``) is the run's CPU time; unlike wall time it does not grow when
    other processes compete for the cores.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}
        self._runs: dict[str, int] = {}

    def add(self, model: str, seconds: float) -> None:
        """Record one run of ``model`` that took ``seconds``."""
        with self._lock:
            self._seconds[model] = self._seconds.get(model, 0.0) + seconds
            self._runs[model] = self._runs.get(model, 0) + 1

    def snapshot(self) -> dict[str, tuple[float, int]]:
        """``{model: (seconds, runs)}`` so far."""
        with self._lock:
            return {m: (self._seconds[m], self._runs[m]) for m in self._seconds}


class TimedSession:
    """An onnxruntime session that reports each ``run`` to a :class:`ModelClock`."""

    def __init__(self, session: ort.InferenceSession, model: str, clock: ModelClock) -> None:
        self.session, self.model, self.clock = session, model, clock

    def run(self, output_names: Any, input_feed: dict[str, Any]) -> list[Any]:
        """``InferenceSession.run``, timed."""
        t0 = time.thread_time()
        try:
            return list(self.session.run(output_names, input_feed))
        finally:
            self.clock.add(self.model, time.thread_time() - t0)

    def get_inputs(self) -> list[Any]:
        """The wrapped session's inputs."""
        return list(self.session.get_inputs())

    def get_outputs(self) -> list[Any]:
        """The wrapped session's outputs."""
        return list(self.session.get_outputs())


class ModelStore:
    """Verified model files of one models folder; builds sessions on demand."""

    def __init__(
        self,
        models_dir: str | os.PathLike[str] | None = None,
        manifest: dict[str, ModelSpec] | None = None,
        intra_op_threads: int = 1,
        clock: ModelClock | None = None,
    ) -> None:
        self.models_dir = resolve_models_dir(models_dir)
        self.manifest = manifest if manifest is not None else load_manifest()
        self.intra_op_threads = intra_op_threads
        #: When set, every session built here reports its inference time to it.
        self.clock = clock
        self._verified: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        """Verified path of a model (checked once per store)."""
        if name not in self.manifest:
            raise ModelError(f"unknown model {name!r}; known: {sorted(self.manifest)}")
        if name not in self._verified:
            self._verified[name] = verify_model(self.models_dir, self.manifest[name])
        return self._verified[name]

    def session(self, name: str) -> ort.InferenceSession | TimedSession:
        """A fresh onnxruntime session for a verified model (timed when a clock is set)."""
        session = make_session(self.path(name), intra_op_threads=self.intra_op_threads)
        return session if self.clock is None else TimedSession(session, name, self.clock)

    def verify_all(self) -> list[dict[str, object]]:
        """Check every manifest file; one result row per model (never raises per file)."""
        rows: list[dict[str, object]] = []
        for name, spec in self.manifest.items():
            row: dict[str, object] = {"name": name, "file": spec.file, "expected": spec.sha256}
            try:
                verify_model(self.models_dir, spec)
                row.update(ok=True, found=spec.sha256)
            except ModelChecksumError as exc:
                row.update(ok=False, error=str(exc), found=sha256_file(self.models_dir / spec.file))
            except ModelMissingError as exc:
                row.update(ok=False, error=str(exc), found=None)
            except OSError as exc:  # unreadable file: report it, keep checking the rest
                row.update(ok=False, error=f"cannot read {spec.file}: {exc}", found=None)
            rows.append(row)
        return rows
