"""What a terminal's offer may cost the server: one video m-line, a bounded number of ICE
candidates (all on 127.0.0.1)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from aiortc import RTCPeerConnection

from pipeline.errors import InvalidRequest
from stream_server.app import PEERS
from stream_server.bench_camera import send_video
from stream_server.webrtc import (
    MAX_REMOTE_CANDIDATES,
    VideoIngest,
    rtc_configuration,
    validate_offer,
)
from tests.terminal import Gradient


async def _offer(*kinds: str) -> str:
    """A real aiortc offer with one sending m-line per entry of ``kinds``."""
    pc = RTCPeerConnection(rtc_configuration())
    for kind in kinds:
        if kind == "video":
            send_video(pc, Gradient())
        else:
            pc.addTransceiver(kind, direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = str(pc.localDescription.sdp)
    await pc.close()
    return sdp


def _with_candidates(sdp: str, n: int) -> str:
    """``sdp`` with its candidates replaced by ``n`` loopback host candidates."""
    lines = [f"a=candidate:{i} 1 udp 2130706431 127.0.0.1 {40000 + i} typ host" for i in range(n)]
    stripped = re.sub(r"a=candidate:[^\r\n]*\r\n", "", sdp)
    return stripped.replace(
        "a=end-of-candidates\r\n", "\r\n".join([*lines, "a=end-of-candidates\r\n"])
    )


# --- the offer ---------------------------------------------------------------------------
EXTRA_TRACKS = [("video", "video"), ("video", "audio"), ("audio", "video")]


@pytest.mark.parametrize("kinds", EXTRA_TRACKS)
async def test_an_offer_of_more_than_one_track_is_refused(
    loopback_ice: None, kinds: tuple[str, ...]
) -> None:
    sdp = await _offer(*kinds)
    assert sdp.count("m=") == 2
    peers: set[RTCPeerConnection] = set()
    with pytest.raises(InvalidRequest, match="2 m-lines") as info:
        await VideoIngest(lambda f, t: None, peers).start(sdp, "offer")
    assert info.value.code == "bad_sdp"
    assert not peers  # no peer connection, so no receivers and no decoder threads


async def test_ice_candidates_are_bounded_and_loopback_is_fine(loopback_ice: None) -> None:
    sdp = await _offer("video")
    assert "127.0.0.1" in sdp
    validate_offer(_with_candidates(sdp, MAX_REMOTE_CANDIDATES), "offer")  # loopback is fine
    for n in (MAX_REMOTE_CANDIDATES + 1, 100):
        with pytest.raises(InvalidRequest, match=f"{n} ICE candidates") as info:
            validate_offer(_with_candidates(sdp, n), "offer")
        assert info.value.code == "bad_sdp"


async def test_the_server_answers_bad_sdp_and_no_answer(make_env: Any) -> None:
    env = await make_env()
    term = await env.terminal()
    one = await _offer("video")
    refused = [
        await _offer("video", "video"),
        await _offer("video", "audio"),
        _with_candidates(one, 100),
    ]
    for sdp in refused:
        await term.send({"type": "offer", "sdp": sdp, "sdp_type": "offer"})
        error = await term.expect("error", "answer", timeout=10)
        assert error["type"] == "error" and error["code"] == "bad_sdp", error
        assert not env.app[PEERS]
    await term.send({"type": "ping"})
    await term.expect("pong")
    assert "answer" not in term.types()
    # The socket stays usable: a single video track is answered.
    await term.send({"type": "offer", "sdp": one, "sdp_type": "offer"})
    assert (await term.expect("error", "answer", timeout=10))["type"] == "answer"
