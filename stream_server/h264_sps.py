"""The picture size an H.264 access unit's sequence parameter set declares, before decoding.

The decode gate (``stream_server/decode_gate.py``) bounds the picture a VP8 keyframe may make
the decoder allocate by reading the keyframe header. H.264 has no such header: the size is in
the sequence parameter set (SPS, NAL type 7), which an encoder sends in band before each IDR
(browsers and libx264 do). This module finds it in the Annex B access unit aiortc's
depacketizer builds, undoes emulation prevention, and parses the SPS up to
``frame_mbs_only_flag`` (ITU-T H.264 7.3.2.1.1), which is all the size needs.

The size is in whole macroblocks, before cropping: an upper bound of the decoded picture
(1920x1080 is coded as 1920x1088), which is what a limit needs.
"""

from __future__ import annotations

import re

#: Profiles whose SPS carries chroma format, bit depths and scaling matrices (7.3.2.1.1).
_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})
#: More leading zeros than this in an Exp-Golomb code: no value the decoder would accept.
_MAX_LEADING_ZEROS = 32
#: H.264 caps num_ref_frames_in_pic_order_cnt_cycle at 255 (7.4.2.1.1).
_MAX_POC_CYCLE = 255
#: Where a NAL unit ends in an Annex B stream: the next start code or trailing zero bytes
#: (neither can occur inside a NAL unit: emulation prevention rules it out).
_NAL_END = re.compile(rb"\x00\x00[\x00\x01]")


class _Truncated(Exception):
    """The SPS ended, or held an absurd value, before the size was read."""


class _Bits:
    """Reads an RBSP (emulation prevention already removed) bit by bit, most significant first."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self._end = len(data) * 8

    def u(self, n: int) -> int:
        """An ``n``-bit unsigned number (u(n))."""
        if self._pos + n > self._end:
            raise _Truncated
        value = 0
        for _ in range(n):
            byte = self._data[self._pos >> 3]
            value = value << 1 | (byte >> (7 - (self._pos & 7))) & 1
            self._pos += 1
        return value

    def ue(self) -> int:
        """An unsigned Exp-Golomb number (ue(v), 9.1)."""
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > _MAX_LEADING_ZEROS:
                raise _Truncated
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        """A signed Exp-Golomb number (se(v), 9.1.1): 1, -1, 2, -2, ... for 1, 2, 3, 4, ..."""
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


def _skip_scaling_list(bits: _Bits, size: int) -> None:
    """Read past one scaling_list() of ``size`` entries (7.3.2.1.1.1)."""
    last = 8
    for _ in range(size):
        next_scale = (last + bits.se() + 256) % 256
        if next_scale == 0:
            return  # no more deltas: the remaining entries repeat the last one
        last = next_scale


def _sps_size(rbsp: bytes) -> tuple[int, int]:
    """Width and height, in luma samples, of a seq_parameter_set_data() (after the NAL header)."""
    bits = _Bits(rbsp)
    profile_idc = bits.u(8)
    bits.u(8)  # constraint_set0..5 flags, reserved_zero_2bits
    bits.u(8)  # level_idc
    bits.ue()  # seq_parameter_set_id
    if profile_idc in _HIGH_PROFILES:
        chroma_format_idc = bits.ue()
        if chroma_format_idc == 3:
            bits.u(1)  # separate_colour_plane_flag
        bits.ue()  # bit_depth_luma_minus8
        bits.ue()  # bit_depth_chroma_minus8
        bits.u(1)  # qpprime_y_zero_transform_bypass_flag
        if bits.u(1):  # seq_scaling_matrix_present_flag
            for i in range(12 if chroma_format_idc == 3 else 8):
                if bits.u(1):  # seq_scaling_list_present_flag[i]
                    _skip_scaling_list(bits, 16 if i < 6 else 64)
    bits.ue()  # log2_max_frame_num_minus4
    pic_order_cnt_type = bits.ue()
    if pic_order_cnt_type == 0:
        bits.ue()  # log2_max_pic_order_cnt_lsb_minus4
    elif pic_order_cnt_type == 1:
        bits.u(1)  # delta_pic_order_always_zero_flag
        bits.se()  # offset_for_non_ref_pic
        bits.se()  # offset_for_top_to_bottom_field
        cycle = bits.ue()
        if cycle > _MAX_POC_CYCLE:
            raise _Truncated
        for _ in range(cycle):
            bits.se()  # offset_for_ref_frame[i]
    bits.ue()  # max_num_ref_frames
    bits.u(1)  # gaps_in_frame_num_value_allowed_flag
    width_mbs = bits.ue() + 1
    height_map_units = bits.ue() + 1
    frame_mbs_only = bits.u(1)
    # Without frame_mbs_only_flag a map unit is a pair of macroblocks (one per field).
    return width_mbs * 16, (2 - frame_mbs_only) * height_map_units * 16


def h264_keyframe_size(data: bytes) -> tuple[int, int] | None:
    """Width and height an H.264 access unit's SPS declares; None without a parseable SPS.

    ``data`` is an Annex B access unit (NAL units after ``00 00 01`` start codes), as aiortc
    reassembles H.264 frames. The size is in whole macroblocks, before cropping (an upper
    bound of the decoded picture). If the unit holds several SPSs (each with its own id, any
    of which a picture may refer to), the largest is returned, so that a small one cannot
    hide a large one. None if there is no SPS (an IDR may rely on one sent earlier) or none
    can be parsed (cut short, or an Exp-Golomb code with more than 32 leading zeros).
    """
    best: tuple[int, int] | None = None
    i = data.find(b"\x00\x00\x01")
    while i != -1 and i + 3 < len(data):
        start = i + 3
        end_match = _NAL_END.search(data, start)
        end = end_match.start() if end_match else len(data)
        if data[start] & 0x1F == 7:
            # Emulation prevention (7.4.1): the encoder put 03 after each 00 00 that would
            # otherwise be followed by 00-03; the parser must see the bytes without it.
            rbsp = data[start + 1 : end].replace(b"\x00\x00\x03", b"\x00\x00")
            try:
                size = _sps_size(rbsp)
            except _Truncated:
                size = None
            if size is not None and (best is None or size[0] * size[1] > best[0] * best[1]):
                best = size
        i = data.find(b"\x00\x00\x01", max(end, start))
    return best
