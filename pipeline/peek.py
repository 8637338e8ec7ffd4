"""Header peeks: the size of an encoded image, read without decoding it, or None.

``pipeline.image.decode_image`` refuses a file whose peeked size is too large before OpenCV
allocates anything, so the peek must read the size the decoder will use, and must refuse
(None) any file where the two could disagree or where the decoder would spend unbounded
memory or time before noticing a lie:

- PNG: every chunk is walked. IHDR comes first; each length is at most 2**31 - 1 (the PNG
  limit) and fits in the bytes left; the file reaches IEND. A chunk length past the end of
  the file made libpng allocate it (4 GB for a 105-byte file claiming 0xFFFFFFF0).
- JPEG: the markers up to the first scan are parsed strictly: nothing but legal 0xFF fill
  bytes between segments, every length within the file, exactly one frame header (SOF).
  libjpeg skips garbage and ``FF 00`` between markers, so a lax peek could be shown a fake
  small SOF inside what libjpeg skips while libjpeg decodes a huge real one. Progressive
  files are limited to ``MAX_SCANS`` scans: each scan is a pass over the whole coefficient
  buffer, and libjpeg feeds zeros when the data runs out, so a 1.3 MB file repeating one
  59-byte scan 20,000 times took 45 s of a pipeline worker. Scans are counted up to EOI,
  where the decoder stops: a phone's motion photo appends an MP4 of several MB there.
- WebP and BMP: their fixed headers.

Scanning uses regular expressions and ``bytes.count`` (C loops), never a per-byte Python loop.
"""

from __future__ import annotations

import re
import struct

from pipeline.errors import ImageError

#: Largest decoded image (pixels) that ``pipeline.image`` decodes. Camera frames are ~0.3-2 MP;
#: 40 MP admits any phone photo while keeping a decode under ~120 MB. Here, free of OpenCV,
#: so that ``facepay`` can hand it to OpenCV before OpenCV loads (stream_server.cli.main).
MAX_PIXELS = 40_000_000

#: Most scans (SOS markers) accepted in one JPEG. Encoders write 1 (baseline) or about 10
#: (progressive; libjpeg's default script has 10 for colour, mozjpeg fewer than 70).
#: libjpeg-turbo's ``djpeg -maxscans`` exists for the same reason.
MAX_SCANS = 100
#: Most segments before the first scan (real photos have 10-30), and again between the scans,
#: so that the Python loops below stay short on a 10 MB file of empty comment segments.
MAX_SEGMENTS = 1000

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MAX_CHUNK = 2**31 - 1
#: Frame headers: SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: Markers without a length: TEM and the restart markers RST0..RST7.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_SOS = 0xDA
_FILL = re.compile(rb"\xff+")
#: The next marker in or after entropy-coded data: FF, then a code that is neither a stuffed
#: zero (FF 00), a restart marker (RST0..RST7, which stay inside a scan) nor a fill byte (the
#: last FF of a run of fill bytes matches). One FF, not ``\xff+``: 3-10 times faster.
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def peek_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, WebP or BMP header without decoding, else None.

    None also for a PNG or JPEG whose structure the peek refuses (see the module docstring):
    callers treat None as "corrupt or unsupported". ImageError for a JPEG with too many scans.
    """
    if data[:8] == _PNG_SIGNATURE:
        return _peek_png(data)
    if data[:2] == b"\xff\xd8":
        return _peek_jpeg(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        return _peek_webp(data)
    if data[:2] == b"BM" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)
    return None


def _peek_png(data: bytes) -> tuple[int, int] | None:
    if len(data) < 33 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    width, height = struct.unpack_from(">II", data, 16)
    pos = 8
    end = len(data)
    while pos + 12 <= end:  # length, type, data, CRC
        (length,) = struct.unpack_from(">I", data, pos)
        if length > _PNG_MAX_CHUNK or pos + 12 + length > end:
            return None
        if data[pos + 4 : pos + 8] == b"IEND":
            return int(width), int(height)
        pos += 12 + length
    return None  # no IEND: cut off, or a chunk header claiming what is not there


def _peek_jpeg(data: bytes) -> tuple[int, int] | None:
    """The frame size of a JPEG whose markers up to the first scan parse strictly."""
    end = len(data)
    pos = 2  # after SOI
    size: tuple[int, int] | None = None
    for _ in range(MAX_SEGMENTS):
        # A marker is 0xFF, any number of 0xFF fill bytes (JPEG B.1.1.2), then the code.
        fill = _FILL.match(data, pos)
        if fill is None:
            return None  # garbage between segments (libjpeg would skip it)
        pos = fill.end()
        if pos >= end:
            return None
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0x00, 0xD8, 0xD9):
            return None  # a stuffed zero, a second SOI or EOI before any scan
        if pos + 2 > end:
            return None
        (seg_len,) = struct.unpack_from(">H", data, pos)
        if seg_len < 2 or pos + seg_len > end:
            return None
        if marker in _JPEG_SOF:
            if size is not None or seg_len < 8:
                return None  # libjpeg refuses a second SOF; this peek refuses it first
            height, width = struct.unpack_from(">HH", data, pos + 3)
            size = (int(width), int(height))
        pos += seg_len
        if marker == _SOS:
            break
    else:
        return None  # more than MAX_SEGMENTS segments before the first scan
    if size is None:
        return None  # a scan before any frame header
    scans = _count_scans(data, pos)
    if scans is None:
        return None
    if scans > MAX_SCANS:
        raise ImageError(f"JPEG has more than {MAX_SCANS} scans (progressive passes)")
    return size


def _count_scans(data: bytes, pos: int) -> int | None:
    """The JPEG's scans up to EOI (counting stops past MAX_SCANS), from the first scan's data
    at ``pos``; None (refuse) for markers libjpeg refuses or endless segments between scans.

    The decoder stops at EOI: whatever follows (the MP4 of a phone's motion photo, the gain
    map of an Ultra HDR photo, megabytes where random bytes hold FF DA once per 64 KiB) is
    not counted. Entropy-coded data stuffs a zero after each FF and holds RST markers, so the
    next ``_MARKER`` match after a scan is the marker that ends it.
    """
    scans = 1
    end = len(data)
    for _ in range(MAX_SCANS + MAX_SEGMENTS):
        found = _MARKER.search(data, pos)
        if found is None:
            return scans  # no EOI: a cut-off file, left to the decoder (which refuses it)
        marker = data[found.end() - 1]
        pos = found.end()
        if marker == 0xD9:
            return scans
        if marker in _JPEG_STANDALONE:
            continue
        if marker == 0xD8 or marker in _JPEG_SOF:
            return None  # libjpeg refuses a second SOI or SOF
        if pos + 2 > end:
            return scans  # cut off inside a marker
        (seg_len,) = struct.unpack_from(">H", data, pos)
        if seg_len < 2:
            return None
        if pos + seg_len > end:
            # Cut off inside a segment: count as before, every FF DA left in the file.
            return scans + data.count(b"\xff\xda", pos)
        if marker == _SOS:
            scans += 1
            if scans > MAX_SCANS:
                return scans
        pos += seg_len
    return None  # more than MAX_SEGMENTS segments between scans


def _peek_webp(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None
