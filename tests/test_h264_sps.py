"""H.264 picture sizes read from the SPS before decoding, and the decode gate holding H.264
streams to ``max_pixels`` with them (stream_server/h264_sps.py, stream_server/decode_gate.py).

Real frames come from libx264 through PyAV, in the Annex B form aiortc hands the decoder;
SPS variants no x264 setting here produces (scaling lists, picture order count type 1,
emulation prevention before the size) are built bit by bit."""

from __future__ import annotations

import asyncio
import fractions
import re

import av
import numpy as np
import pytest

from stream_server.h264_sps import h264_keyframe_size
from tests.decode_fakes import FakeCodec, FakeFrame, limited_gate

H264 = FakeCodec("H264")


def _encode(
    width: int, height: int, options: dict[str, str], pix_fmt: str = "yuv420p", n: int = 3
) -> list[bytes]:
    """``n`` frames of moving noise from libx264: an IDR (with SPS and PPS), then P frames."""
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, pix_fmt
    codec.time_base = fractions.Fraction(1, 15)
    codec.options = options
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    out: list[bytes] = []
    for i in range(n):
        image = np.ascontiguousarray(np.roll(base, 5 * i, axis=1))
        frame = av.VideoFrame.from_ndarray(image, format="bgr24").reformat(format=pix_fmt)
        frame.pts = i
        out.extend(bytes(p) for p in codec.encode(frame))
    out.extend(bytes(p) for p in codec.encode(None))
    return out


FAST = {"preset": "ultrafast", "tune": "zerolatency"}


def _nals(access_unit: bytes) -> list[bytes]:
    """The NAL units of an Annex B access unit (a start code never occurs inside one)."""
    return [n for n in re.split(rb"\x00\x00\x00?\x01", access_unit) if n]


def _annex_b(nals: list[bytes]) -> bytes:
    return b"".join(b"\x00\x00\x00\x01" + n for n in nals)


@pytest.fixture(scope="module")
def h264_1280x720() -> list[bytes]:
    return _encode(1280, 720, FAST)


# --- sizes from a real encoder -----------------------------------------------------------
@pytest.mark.parametrize(
    ("width", "height", "options", "pix_fmt", "profile_idc", "coded"),
    [
        (640, 480, FAST, "yuv420p", 66, (640, 480)),
        (1280, 720, FAST, "yuv420p", 66, (1280, 720)),
        (352, 288, FAST, "yuv420p", 66, (352, 288)),
        (350, 286, FAST, "yuv420p", 66, (352, 288)),  # rounded up to whole macroblocks
        (1920, 1080, {"preset": "medium", "profile": "high"}, "yuv420p", 100, (1920, 1088)),
        (640, 480, {"preset": "fast"}, "yuv444p", 244, (640, 480)),  # High 4:4:4
        # Interlaced: frame_mbs_only_flag 0, a map unit is two macroblocks high.
        (320, 240, {"preset": "fast", "x264-params": "interlaced=1"}, "yuv420p", 100, (320, 256)),
    ],
)
def test_the_sps_of_a_real_keyframe_gives_the_coded_size(
    width: int,
    height: int,
    options: dict[str, str],
    pix_fmt: str,
    profile_idc: int,
    coded: tuple[int, int],
) -> None:
    packets = _encode(width, height, options, pix_fmt)
    assert packets[0].startswith(b"\x00\x00\x00\x01\x67")  # Annex B, SPS first
    assert packets[0][5] == profile_idc  # the profile the case means to cover
    assert h264_keyframe_size(packets[0]) == coded
    assert all(h264_keyframe_size(p) is None for p in packets[1:])  # P frames carry no SPS


def test_a_truncated_or_missing_sps_gives_no_size(h264_1280x720: list[bytes]) -> None:
    keyframe = h264_1280x720[0]
    sps = _nals(keyframe)[0]
    sizes = [h264_keyframe_size(_annex_b([sps[:cut]])) for cut in range(len(sps) + 1)]
    first = sizes.index((1280, 720))  # where frame_mbs_only_flag is in: the size is read
    assert first > 4 and set(sizes[:first]) == {None} and set(sizes[first:]) == {(1280, 720)}
    assert h264_keyframe_size(_annex_b(_nals(keyframe)[1:])) is None  # IDR without SPS
    assert h264_keyframe_size(b"") is None
    assert h264_keyframe_size(b"\x00\x00\x01") is None
    assert h264_keyframe_size(b"\x00\x00\x01\x67\x42\x00\x1f" + bytes(64)) is None  # all zeros


# --- SPS variants built bit by bit --------------------------------------------------------
class _BitWriter:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def u(self, n: int, value: int) -> _BitWriter:
        self.bits += [(value >> (n - 1 - i)) & 1 for i in range(n)]
        return self

    def ue(self, value: int) -> _BitWriter:
        n = (value + 1).bit_length()
        return self.u(n - 1, 0).u(n, value + 1)

    def se(self, value: int) -> _BitWriter:
        return self.ue(2 * value - 1 if value > 0 else -2 * value)

    def sps_nal(self) -> bytes:
        """An SPS NAL unit with a start code: rbsp_trailing_bits, then emulation prevention."""
        bits = [*self.bits, 1]
        bits += [0] * (-len(bits) % 8)
        rbsp = bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))
        out, zeros = bytearray(), 0
        for byte in rbsp:
            if zeros >= 2 and byte <= 3:
                out.append(3)
                zeros = 0
            out.append(byte)
            zeros = zeros + 1 if byte == 0 else 0
        return b"\x00\x00\x00\x01\x67" + bytes(out)


def _sps(
    profile_idc: int,
    width_mbs: int,
    height_units: int,
    *,
    level: int = 31,
    sps_id: int = 0,
    chroma_format_idc: int = 1,
    scaling_lists: list[list[int] | None] | None = None,
    poc_type: int = 0,
    poc_cycle: tuple[int, ...] = (),
    frame_mbs_only: int = 1,
) -> bytes:
    """A seq_parameter_set_data() (7.3.2.1.1) up to frame_mbs_only_flag, as a NAL unit.
    ``scaling_lists`` holds each list's delta_scale values (None: list not present)."""
    w = _BitWriter().u(8, profile_idc).u(8, 0).u(8, level).ue(sps_id)
    if profile_idc in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
        w.ue(chroma_format_idc)
        if chroma_format_idc == 3:
            w.u(1, 0)
        w.ue(0).ue(0).u(1, 0).u(1, scaling_lists is not None)
        for deltas in scaling_lists or []:
            w.u(1, deltas is not None)
            for delta in deltas or []:
                w.se(delta)
    w.ue(0).ue(poc_type)
    if poc_type == 0:
        w.ue(2)
    elif poc_type == 1:
        w.u(1, 0).se(-3).se(1 << 20).ue(len(poc_cycle))
        for offset in poc_cycle:
            w.se(offset)
    w.ue(1).u(1, 0).ue(width_mbs - 1).ue(height_units - 1).u(1, frame_mbs_only)
    return w.sps_nal()


def test_scaling_lists_are_read_past() -> None:
    # Full 4x4 lists, one ended at once by nextScale 0, absent ones, full 8x8 lists.
    lists: list[list[int] | None] = [[1] * 16, [-8], None, [0] * 16, None, [2, -2] * 8]
    lists += [[1, -1] * 32, [-8]]
    assert h264_keyframe_size(_sps(100, 80, 45, scaling_lists=lists)) == (1280, 720)
    # 4:4:4 has 12 lists; reading 8 would take the 9th's flag for the size.
    lists_444: list[list[int] | None] = [[3] * 16] * 6 + [[1, -1] * 32] * 6
    sps_444 = _sps(244, 40, 30, chroma_format_idc=3, scaling_lists=lists_444)
    assert h264_keyframe_size(sps_444) == (640, 480)


def test_picture_order_count_types_and_field_coding() -> None:
    assert h264_keyframe_size(_sps(66, 22, 18, poc_type=2)) == (352, 288)
    poc_type_1 = _sps(77, 22, 18, poc_type=1, poc_cycle=(5, -7, 1 << 16))
    assert h264_keyframe_size(poc_type_1) == (352, 288)
    assert h264_keyframe_size(_sps(77, 120, 34, frame_mbs_only=0)) == (1920, 1088)


def test_emulation_prevention_bytes_are_removed() -> None:
    # Flags 0, level 0, then ue(63) = 0000001 000000: 00 00 02 must be escaped.
    nal = _sps(66, 40, 30, level=0, sps_id=63)
    assert b"\x00\x00\x03" in nal
    assert h264_keyframe_size(nal) == (640, 480)
    nal = _sps(77, 40, 30, poc_type=1, poc_cycle=(1 << 24, -(1 << 24)))  # long runs of zeros
    assert b"\x00\x00\x03" in nal
    assert h264_keyframe_size(nal) == (640, 480)


def test_huge_and_absurd_sizes() -> None:
    assert h264_keyframe_size(_sps(100, 1024, 1024)) == (16384, 16384)
    # An Exp-Golomb code of more than 32 leading zeros is refused, not read as a number.
    assert h264_keyframe_size(_sps(66, 1 << 32, 1)) == (16 << 32, 16)  # 32 zeros: read
    assert h264_keyframe_size(_sps(66, (1 << 40) + 1, 1)) is None  # 41 zeros: refused
    # Of several SPSs (a picture may name either), the largest counts.
    two = _sps(66, 40, 30) + _sps(66, 256, 256)
    assert h264_keyframe_size(two) == (4096, 4096)


# --- the decode gate ---------------------------------------------------------------------


async def test_an_oversized_h264_keyframe_and_its_frames_never_reach_the_decoder(
    h264_1280x720: list[bytes],
) -> None:
    gate, receiver, decoded, oversized = limited_gate(640 * 480)
    for data in h264_1280x720:
        gate.put((H264, FakeFrame(data)), decoded.append)
    await asyncio.sleep(0)
    assert decoded == [] and gate.oversized == len(h264_1280x720) == len(oversized)
    assert receiver.plis == [1234] and gate.skipped == 0 and gate.corrupt == 0
    # Within the limit, the same frames are passed.
    gate, receiver, decoded, oversized = limited_gate(1920 * 1080)
    for data in h264_1280x720:
        gate.put((H264, FakeFrame(data)), decoded.append)
    assert [f.data for _, f in decoded] == h264_1280x720 and gate.oversized == 0


def test_an_idr_without_an_sps_is_passed(h264_1280x720: list[bytes]) -> None:
    # The SPS may have come in an earlier frame: not finding one must not stop the stream.
    idr_only = _annex_b([n for n in _nals(h264_1280x720[0]) if n[0] & 0x1F != 7])
    gate, _, decoded, _ = limited_gate(640 * 480)
    gate.put((H264, FakeFrame(idr_only)), decoded.append)
    assert len(decoded) == 1 and gate.oversized == 0


async def test_an_oversized_sps_outside_an_idr_is_withheld(h264_1280x720: list[bytes]) -> None:
    # A sender cannot slip a large SPS in ahead of an IDR that carries none.
    nals = _nals(h264_1280x720[0])
    parameter_sets = _annex_b([n for n in nals if n[0] & 0x1F in (7, 8)])
    gate, _, decoded, oversized = limited_gate(640 * 480)
    gate.put((H264, FakeFrame(parameter_sets)), decoded.append)
    assert decoded == [] and gate.oversized == 1 == len(oversized)
