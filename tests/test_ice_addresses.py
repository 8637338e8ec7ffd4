"""``server.ice_addresses``: the addresses a server offers terminals for their video.

Without it aioice offers every address of the host (docker0, a VPN, and never loopback);
with it the answer's ICE candidates are exactly the configured ones, and the restriction
is lifted again when the app stops. Real server, real Redis, a real aiortc offer.
"""

from __future__ import annotations

import aioice.ice
import pytest
from pydantic import ValidationError

from session.config import FacePayConfig
from stream_server.webrtc import (
    restore_host_addresses,
    restrict_host_addresses,
)
from tests.e2e import offer_sdp, start_env


def _candidate_hosts(sdp: str) -> set[str]:
    return {line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")}


async def test_the_answer_offers_only_the_configured_addresses(
    aiohttp_server, redis_url, models_dir
):
    discovered = aioice.ice.get_host_addresses
    assert "127.0.0.1" not in discovered(True, True)  # so the assertion below can fail
    env = await start_env(
        aiohttp_server, redis_url, models_dir, server={"ice_addresses": ["127.0.0.1"]}
    )
    try:
        term = await env.terminal()
        await term.send({"type": "offer", "sdp": await offer_sdp(), "sdp_type": "offer"})
        answer = await term.expect("answer")
        assert _candidate_hosts(answer["sdp"]) == {"127.0.0.1"}, answer["sdp"]
    finally:
        await env.close()
        await env.server.close()
    assert aioice.ice.get_host_addresses is discovered  # lifted when the app stopped


async def test_stopping_restores_the_restriction_that_was_in_force_before(
    aiohttp_server, redis_url, models_dir
):
    """Process-wide: an app with ``ice_addresses`` that stops puts back what was there
    before it (another app's restriction, a test's), not aioice's own discovery."""
    discovered = restrict_host_addresses(["127.0.0.1"])
    before = aioice.ice.get_host_addresses
    try:
        env = await start_env(
            aiohttp_server, redis_url, models_dir, server={"ice_addresses": ["127.0.0.2"]}
        )
        assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.2"]
        await env.close()
        await env.server.close()
        assert aioice.ice.get_host_addresses is before
    finally:
        restore_host_addresses(discovered)


@pytest.mark.parametrize("bad", [["localhost"], ["10.0.0.300"], ["127.0.0.1"] * 17])
def test_ice_addresses_must_be_ip_addresses(bad):
    with pytest.raises(ValidationError):
        FacePayConfig.model_validate({"server": {"ice_addresses": bad}})
