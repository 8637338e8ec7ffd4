"""Download model weights named by the manifest, verified by sha256.

Pure standard library (``urllib``), blocking, no asyncio. Every download streams into a
temporary file in the destination folder while hashing; the body is capped at the manifest
size plus a small slack so a hostile or broken server cannot fill the disk; the file is
renamed into place only when its sha256 matches the manifest. Whatever goes wrong, no
partial or altered file is left behind.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import DownloadRefused, DownloadUnreachable, ModelError
from pipeline.models import ModelSpec, verify_model

log = logging.getLogger(__name__)

#: Extra bytes accepted beyond the manifest size before a download is cut off.
SIZE_SLACK = 64 * 1024
#: Seconds a single socket operation (connect, read) may block.
DEFAULT_TIMEOUT_S = 30.0
#: Seconds a whole file may take, so a trickling server cannot hold the command forever.
DEFAULT_DEADLINE_S = 600.0
CHUNK = 64 * 1024
ALLOWED_SCHEMES = ("http", "https")
USER_AGENT = "facepay-models-fetch/1"

Progress = Callable[[str], None]


@dataclass(slots=True)
class FetchResult:
    """Outcome for one model: ``present``, ``downloaded`` or ``failed``."""

    name: str
    file: str
    status: str
    source: str | None = None
    error: str | None = None
    reached: bool = False
    attempts: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        """The row printed by ``facepay models fetch``."""
        row: dict[str, object] = {
            "name": self.name,
            "file": self.file,
            "status": self.status,
            "source": self.source,
        }
        if self.error is not None:
            row["error"] = self.error
        return row


def mirror_url(mirror: str, spec: ModelSpec) -> str:
    """``{mirror}/{file}`` with the file path URL-quoted."""
    return mirror.rstrip("/") + "/" + urllib.parse.quote(spec.file)


def check_url(url: str) -> None:
    """Raise ``ValueError`` unless the URL is http(s) with a host."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ALLOWED_SCHEMES or not parts.netloc:
        raise ValueError(f"unsupported URL {url!r}: only http:// and https:// are allowed")


def target_path(dest: Path, spec: ModelSpec) -> Path:
    """Where a model goes under ``dest``; refuses manifest paths escaping the folder."""
    target = (dest / spec.file).resolve()
    root = dest.resolve()
    if root not in target.parents:
        raise ModelError(f"manifest path {spec.file!r} escapes the models folder {dest}")
    return target


def _open(url: str, timeout: float) -> http.client.HTTPResponse:
    """Open a URL (redirects followed), mapping transport failures to our errors."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise DownloadRefused(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DownloadUnreachable(f"{url}: {exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadUnreachable(f"{url}: {exc}") from exc
    return response


def _copy_hashed(
    response: http.client.HTTPResponse,
    out: BinaryIO,
    url: str,
    spec: ModelSpec,
    cap: int,
    deadline_s: float,
) -> tuple[int, str]:
    """Stream the body into ``out`` while hashing; stop at ``cap`` bytes or the deadline."""
    digest = hashlib.sha256()
    total = 0
    started = time.monotonic()
    while True:
        try:
            chunk = response.read(CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            raise DownloadRefused(f"{url}: {spec.file} download broke off: {exc}") from exc
        if not chunk:
            return total, digest.hexdigest()
        total += len(chunk)
        if total > cap:
            raise DownloadRefused(
                f"{url}: {spec.file} exceeds the manifest's {spec.size} bytes "
                f"(+{SIZE_SLACK} slack); download stopped"
            )
        if time.monotonic() - started > deadline_s:
            raise DownloadRefused(f"{url}: {spec.file} took over {deadline_s:.0f} s")
        digest.update(chunk)
        out.write(chunk)


def download(
    url: str,
    target: Path,
    spec: ModelSpec,
    timeout: float = DEFAULT_TIMEOUT_S,
    deadline_s: float = DEFAULT_DEADLINE_S,
) -> int:
    """Download ``url`` to ``target`` if its sha256 matches ``spec``; return the byte count.

    Raises ``DownloadUnreachable`` when no HTTP answer came back and ``DownloadRefused`` when
    the answer was an error status, too large, cut short or altered. On any failure the
    temporary file is removed and ``target`` is untouched.
    """
    check_url(url)
    cap = spec.size + SIZE_SLACK
    response = _open(url, timeout)
    with response:
        declared = response.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise DownloadRefused(
                f"{url}: {spec.file} announced {declared} bytes, "
                f"more than the manifest's {spec.size} (+{SIZE_SLACK} slack)"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".part", dir=target.parent
        )
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                total, found = _copy_hashed(response, out, url, spec, cap, deadline_s)
                out.flush()
                os.fsync(out.fileno())
            if found != spec.sha256:
                raise DownloadRefused(
                    f"{url}: {spec.file} refused: expected sha256 {spec.sha256}, "
                    f"found {found} ({total} bytes)"
                )
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return total


def fetch_one(
    dest: Path,
    spec: ModelSpec,
    urls: list[str],
    timeout: float = DEFAULT_TIMEOUT_S,
    progress: Progress | None = None,
) -> FetchResult:
    """Make one model present and verified in ``dest``, trying ``urls`` in order."""
    result = FetchResult(name=spec.name, file=spec.file, status="failed")
    note = progress or (lambda _msg: None)
    try:
        verify_model(dest, spec)
    except ModelError as exc:
        log.debug("%s needs fetching: %s", spec.file, exc)
    else:
        result.status = "present"
        note(f"{spec.file}: present and verified")
        return result
    try:
        target = target_path(dest, spec)
    except ModelError as exc:
        result.error = str(exc)
        return result
    for url in urls:
        result.source = url
        note(f"{spec.file}: downloading from {url}")
        started = time.monotonic()
        try:
            size = download(url, target, spec, timeout=timeout)
        except DownloadUnreachable as exc:
            result.attempts.append(str(exc))
            note(f"{spec.file}: unreachable: {exc}")
        except ValueError as exc:
            result.attempts.append(str(exc))
            note(f"{spec.file}: skipped: {exc}")
        except (ModelError, OSError) as exc:
            result.reached = True
            result.attempts.append(str(exc))
            note(f"{spec.file}: refused: {exc}")
        else:
            result.reached = True
            result.status = "downloaded"
            result.error = None
            note(f"{spec.file}: {size} bytes in {time.monotonic() - started:.1f} s, sha256 ok")
            return result
    result.error = "; ".join(result.attempts) if result.attempts else "no URL to try"
    return result


def fetch_models(
    dest: Path,
    manifest: Mapping[str, ModelSpec],
    mirror: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    progress: Progress | None = None,
) -> list[FetchResult]:
    """Fetch every manifest model missing or altered in ``dest``.

    With ``mirror`` only ``{mirror}/{file}`` is tried; otherwise the manifest URLs in order.
    """
    if mirror is not None:
        check_url(mirror)
    dest.mkdir(parents=True, exist_ok=True)
    results: list[FetchResult] = []
    for spec in manifest.values():
        urls = [mirror_url(mirror, spec)] if mirror is not None else list(spec.urls)
        results.append(fetch_one(dest, spec, urls, timeout=timeout, progress=progress))
    return results
