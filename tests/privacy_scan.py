"""Scanners for the privacy proofs (tests/test_privacy.py): what in Redis, a log or a file
looks like a secret, a face template, an embedding or an image.

Each scanner returns a list of findings (empty: nothing found) so that a failing assertion
says where and what. ``test_scanners_find_planted_leaks`` shows that each one does see its
kind of leak.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

from session.crypto import NONCE_BYTES, TAG_BYTES
from session.store import Store

ENC_BYTES = NONCE_BYTES + 128 * 4 + TAG_BYTES  # one encrypted template
SID = re.compile(rb"s_[A-Za-z0-9_-]{22}")
FLOAT_TEXT = re.compile(r"(?:[-+]?\d*\.\d{3,}(?:e[-+]?\d+)?[\s,;]+){8,}")
IMAGE_MAGIC = {
    "jpeg": re.compile(rb"\xff\xd8\xff[\xdb\xe0\xe1\xee]"),
    "png": re.compile(re.escape(b"\x89PNG\r\n\x1a\n")),
    "webp": re.compile(rb"RIFF.{4}WEBP", re.S),
    "bmp": re.compile(rb"BM.{4}\x00\x00\x00\x00", re.S),
    "npy": re.compile(re.escape(b"\x93NUMPY")),
    "jpeg-base64": re.compile(rb"/9j/4"),
    "png-base64": re.compile(rb"iVBORw0KGgo"),
}
MAX_VALUE_BYTES = 4096
SLOWLOG = b"(slowlog)"


def secret_forms(name: str, secret: str) -> dict[str, bytes]:
    """The ways a secret could be written down: plain, UTF-16, base64 and hex."""
    raw = secret.encode()
    return {
        f"{name} (utf-8)": raw,
        f"{name} (utf-16)": secret.encode("utf-16-le"),
        f"{name} (base64)": base64.b64encode(raw).rstrip(b"="),
        f"{name} (base64url)": base64.urlsafe_b64encode(raw).rstrip(b"="),
        f"{name} (hex)": raw.hex().encode(),
        f"{name} (HEX)": raw.hex().upper().encode(),
    }


def float_needles(vectors: Iterable[np.ndarray]) -> set[bytes]:
    """Every 16-byte window (aligned on the element) of each vector in float32 (both byte
    orders), float16 and float64: a window survives LZF literals in an RDB file."""
    needles: set[bytes] = set()
    for vector in vectors:
        for dtype in ("<f4", ">f4", "<f2", "<f8"):
            data = np.asarray(vector, dtype).tobytes()
            size = np.dtype(dtype).itemsize
            needles.update(data[i : i + 16] for i in range(0, len(data) - 15, size))
    return needles


def _longest_run(mask: np.ndarray) -> int:
    if not mask.any():
        return 0
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    return int((edges[1::2] - edges[::2]).max())


def float_run(blob: bytes) -> str | None:
    """A run of >= 32 float32 (or 64 float16) values like a unit embedding's components.

    Random (encrypted) bytes pass one float32 test with p ~ 0.08, so 32 in a row is ~1e-35.
    """
    for dtype, low, need in (("<f4", 1e-6, 32), ("<f2", 6.2e-5, 64)):
        size = np.dtype(dtype).itemsize
        for offset in range(size):
            count = (len(blob) - offset) // size
            if count < need:
                continue
            with np.errstate(invalid="ignore", over="ignore"):
                x = np.abs(np.frombuffer(blob, dtype, count, offset).astype(np.float64))
            run = _longest_run(np.isfinite(x) & (x > low) & (x < 1.0))
            if run >= need:
                return f"{run} plausible {dtype} values in a row"
    return None


def leaks(blob: bytes, secrets: dict[str, bytes], needles: set[bytes]) -> list[str]:
    """What in ``blob`` looks like a secret, a template, an embedding or an image."""
    found = [name for name, form in secrets.items() if form and form in blob]
    if len(blob) >= 16 and any(n in blob for n in needles):
        found.append("raw template bytes")
    found += [f"{kind} image data" for kind, rx in IMAGE_MAGIC.items() if rx.search(blob)]
    run = float_run(blob)
    if run:
        found.append(run)
    return found


def aof_bytes(folder: Path) -> bytes:
    """Everything in the append-only files under ``folder`` (base, increments, manifest)."""
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*.aof")))


async def aof_settled(r: aioredis.Redis) -> None:
    """Wait (bounded) until no AOF rewrite is running or scheduled."""
    deadline = time.monotonic() + 30
    while True:
        info = await r.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            return
        assert time.monotonic() < deadline, "AOF rewrite did not finish"
        await asyncio.sleep(0.05)


async def dump_redis(r: aioredis.Redis) -> dict[bytes, list[bytes]]:
    """Every key with every value it holds (strings, hashes, sets, zsets, lists, streams)."""
    out: dict[bytes, list[bytes]] = {}
    async for key in r.scan_iter(count=500):
        kind = (await r.type(key)).decode()
        if kind == "string":
            values = [await r.get(key)]
        elif kind == "hash":
            values = [x for kv in (await r.hgetall(key)).items() for x in kv]
        elif kind == "set":
            values = list(await r.smembers(key))
        elif kind == "zset":
            values = [m for m, _ in await r.zrange(key, 0, -1, withscores=True)]
        elif kind == "list":
            values = await r.lrange(key, 0, -1)
        elif kind == "stream":
            values = [x for _, f in await r.xrange(key) for kv in f.items() for x in kv]
        elif kind == "none":  # expired between SCAN and TYPE
            continue
        else:
            raise AssertionError(f"unexpected Redis type {kind} at {key!r}")
        out[key] = [v for v in values if v is not None]
    # Not a key, but Redis keeps the (truncated) arguments of slow commands in memory.
    out[SLOWLOG] = [bytes(e["command"]) for e in await r.slowlog_get(128)]
    return out


def _sealed(key: bytes, item: bytes) -> bool:
    """An encrypted template, or a sealed subject->account link (nonce, id of <= 64, tag)."""
    if key.startswith(b"fp:tpl:"):
        return len(item) == ENC_BYTES
    if key.startswith(b"fp:link:s2a:") and item is not key:
        return NONCE_BYTES + TAG_BYTES < len(item) <= NONCE_BYTES + 64 + TAG_BYTES
    return False


def redis_findings(
    dump: dict[bytes, list[bytes]], secrets: dict[str, bytes], needles: set[bytes]
) -> list[str]:
    """Leaks in a Redis dump, and binary values other than encrypted templates."""
    found = []
    for key, values in dump.items():
        for item in [key, *values]:
            found += [f"{key!r}: {what}" for what in leaks(item, secrets, needles)]
            if len(item) > MAX_VALUE_BYTES:
                found.append(f"{key!r}: a {len(item)}-byte value")
            try:
                item.decode("utf-8")
            except UnicodeDecodeError:
                # SLOWLOG shows an encrypted template's first 128 bytes, also binary.
                if key != SLOWLOG and not _sealed(key, item):
                    found.append(f"{key!r}: binary value of {len(item)} bytes")
    return found


def log_findings(lines: Iterable[str], secrets: dict[str, bytes], needles: set[bytes]) -> list[str]:
    """Leaks in log text, plus lists of decimals that could be a printed embedding."""
    found = []
    for line in lines:
        blob = line.encode("utf-8", "surrogateescape")
        found += [f"{what}: {line[:120]!r}" for what in leaks(blob, secrets, needles)]
        if FLOAT_TEXT.search(line):
            found.append(f"printed float list: {line[:120]!r}")
    return found


def file_findings(root: Path, secrets: dict[str, bytes], needles: set[bytes]) -> list[str]:
    """Leaks in every file under ``root`` (except the key and token files themselves)."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_socket()):
        if path.name in ("template.key", "admin.token"):
            continue
        if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".npy", ".npz"):
            found.append(f"{path}: image or array file")
        found += [f"{path}: {what}" for what in leaks(path.read_bytes(), secrets, needles)]
    return found


def record_text(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += " " + logging.Formatter().formatException(record.exc_info)
    return text


async def subject_templates(store: Store, r: aioredis.Redis) -> dict[str, list[np.ndarray]]:
    """Each enrolled subject's templates, decrypted through the store."""
    sids = sorted(s.decode() for s in await r.smembers("fp:subjects"))
    return {sid: (await store.get_subject(sid))[0] for sid in sids}


def check_identity_separation(
    dump: dict[bytes, list[bytes]], people: list[dict[str, str]]
) -> list[str]:
    """Templates sit under random subject ids; only the (sealed) link keys hold a sid, and
    they name no account, name or phone."""
    problems = []
    pii = [p[k].encode() for p in people for k in ("account_id", "name")]
    pii += [re.sub(r"[^0-9+]", "", p["phone"]).encode() for p in people]
    links = (b"fp:link:s2a:", b"fp:link:a2s:", b"fp:subjects")
    for key, values in dump.items():
        if key.startswith(b"fp:tpl:"):
            sid = key[len(b"fp:tpl:") :]
            if not SID.fullmatch(sid):
                problems.append(f"{key!r}: subject id is not random-shaped")
            fields = values[0::2]
            if sorted(fields) != sorted(str(i).encode() for i in range(len(fields))):
                problems.append(f"{key!r}: fields other than template slots {fields}")
            problems += [f"{key!r}: holds {v!r}" for v in pii for x in [key, *values] if v in x]
        elif key.startswith(b"fp:link:"):
            # Sealed and blinded: no link key or value may name a person (docs/privacy.md).
            problems += [f"{key!r}: names {v!r}" for v in pii for x in [key, *values] if v in x]
        elif key != SLOWLOG and not key.startswith(links):
            problems += [f"{key!r}: names a subject id" for x in [key, *values] if SID.search(x)]
    return problems
