"""deploy/nginx.conf, run by a real nginx in front of a real FacePay server on 127.0.0.1.

The compose file's balancer is this config; a text search cannot tell which headers nginx
actually forwards (a location that sets any ``proxy_set_header`` inherits none from its
server block). Here a browser-like terminal (it sends its page's ``Origin``) pays through
the balancer: its WebSocket (and the WebRTC offer/answer on it) goes through nginx, its
video straight to the server, as in a deployment. nginx comes from
scripts/install-system-deps; without it this test fails, it never skips.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.e2e import PASSPHRASE, camera_frames
from tests.terminal import TestTerminal

REPO = Path(__file__).resolve().parent.parent
UPSTREAM = "server facepay:8080 max_fails=2 fail_timeout=10s;"

pytestmark = pytest.mark.usefixtures("loopback_ice")


def _nginx() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        pytest.fail("nginx not found: run scripts/install-system-deps (package nginx-light)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_config(tmp: Path, upstream_port: int, port: int) -> Path:
    """deploy/nginx.conf as shipped, but for one local server, a local port and ``tmp``."""
    conf = (REPO / "deploy/nginx.conf").read_text(encoding="utf-8")
    assert UPSTREAM in conf and "listen 8080;" in conf, "the shipped config changed shape"
    conf = conf.replace(UPSTREAM, f"server 127.0.0.1:{upstream_port};")
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    # Files nginx writes: all under tmp, so it runs as any user and leaves nothing behind.
    paths = "\n".join(
        f"    {kind}_temp_path {tmp / kind};" for kind in ("client_body", "proxy", "fastcgi")
    )
    paths += f"\n    uwsgi_temp_path {tmp / 'uwsgi'};\n    scgi_temp_path {tmp / 'scgi'};"
    conf = conf.replace("http {", f"http {{\n    access_log off;\n{paths}", 1)
    conf = f"pid {tmp / 'nginx.pid'};\nerror_log {tmp / 'error.log'};\n" + conf
    path = tmp / "nginx.conf"
    path.write_text(conf, encoding="utf-8")
    return path


@pytest.fixture
async def balancer(make_env, tmp_path: Path) -> AsyncIterator[tuple[object, str]]:
    """(env, base URL): a FacePay server with one merchant, behind deploy/nginx.conf."""
    env = await make_env()
    port = _free_port()
    conf = _local_config(tmp_path, env.server.port, port)
    proc = subprocess.Popen(
        [_nginx(), "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(100):  # up to 5 s to listen
            if proc.poll() is not None:
                raise AssertionError(f"nginx exited: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("nginx never listened")
        yield env, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(5)


async def test_a_browser_terminal_pays_through_the_balancer(balancer, analyzer, photo):
    env, base = balancer
    await env.enroll(
        "acct-obama", "Barack Obama", "+1 202 555 0101", photo("faces/obama/obama.jpg")
    )
    # The page the balancer served opens its socket on the balancer, from its own origin.
    term = TestTerminal(f"{base}/ws", env.token, origin=base)
    env.terminals.append(term)
    hello = await term.connect()
    assert hello is not None and hello["mode"] == "checkout", term.events
    await term.start_video(camera_frames(analyzer, photo("faces/obama/obama3.jpg")))
    assert (await term.checkout("4.10", "o-lb"))["state"] == "scanning"
    confirm = await term.expect("confirm", "declined")
    assert confirm["type"] == "confirm", term.events
    await term.send(
        {"type": "passphrase", "prompt_id": confirm["prompt_id"], "passphrase": PASSPHRASE}
    )
    assert (await term.until_end())["state"] == "approved", term.events
    assert len(await env.payments()) == 1


async def test_the_balancer_keeps_the_origin_check(balancer):
    """Forwarding the browser's Host must not open the socket to other sites' pages."""
    _, base = balancer
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{base}/ws", origin="http://evil.example")
        assert refused.value.status == 403
        async with http.get(f"{base}/readyz") as ready:  # plain HTTP goes through too
            assert ready.status == 200, await ready.text()
