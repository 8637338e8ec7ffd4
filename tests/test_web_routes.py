"""Browser pages (``stream_server.web``) and ``facepay serve`` over HTTPS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stream_server import web as web_pages
from stream_server.cli import main
from tests.e2e import REPO, SERVER_ENV_VARS, spawn_serve


@pytest.fixture
def web_root(tmp_path: Path) -> Path:
    root = tmp_path / "web"
    (root / "static" / "js").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>FacePay</title>")
    (root / "checkout.html").write_text("<!doctype html><title>Checkout</title>")
    (root / "static" / "js" / "app.js").write_text("console.log('hi');")
    return root


@pytest.fixture
async def client(aiohttp_client, web_root):  # type: ignore[no-untyped-def]
    app = web.Application()
    web_pages.setup(app, web_root)
    return await aiohttp_client(app)


async def test_pages_answer_with_security_headers(client):
    for path, title in (("/", "FacePay"), ("/checkout", "Checkout")):
        resp = await client.get(path)
        assert resp.status == 200
        assert title in await resp.text()
        assert resp.content_type == "text/html"
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
        # WebSockets only to this host (the page's own /ws), not to any host.
        host = f"{client.server.host}:{client.server.port}"
        assert f"connect-src 'self' ws://{host} wss://{host};" in csp
        assert " ws: " not in csp and "media-src 'self' blob:" in csp
        # No other site may frame the pages (a Pay or a consent clicked through a frame).
        assert "frame-ancestors 'none'" in csp and resp.headers["X-Frame-Options"] == "DENY"
        assert "base-uri 'none'" in csp and "form-action 'none'" in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert resp.headers["Permissions-Policy"] == "camera=(self)"


async def test_csp_names_only_a_plain_host(client):
    # A Host that is not host[:port] could add directives to the policy: 'self' alone.
    for host in ("evil.example; script-src *", "a b", "x'y", ""):
        resp = await client.get("/checkout", headers={"Host": host})
        csp = resp.headers["Content-Security-Policy"]
        assert "connect-src 'self'; img-src" in csp, (host, csp)
        assert "script-src *" not in csp
    for host in ("kiosk.example.com", "kiosk.example.com:8443", "10.0.0.7:8080", "[::1]:8080"):
        resp = await client.get("/static/js/app.js", headers={"Host": host})
        csp = resp.headers["Content-Security-Policy"]
        assert f"connect-src 'self' ws://{host} wss://{host};" in csp, (host, csp)


async def test_missing_pages_are_404(client):
    for path in ("/gate", "/enroll", "/static/nope.js", "/static/js/missing.js"):
        assert (await client.get(path)).status == 404


async def test_static_files_without_listing_or_traversal(client):
    resp = await client.get("/static/js/app.js")
    assert resp.status == 200 and "console.log" in await resp.text()
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert (await client.get("/static/js/")).status in (403, 404)
    assert (await client.get("/static/")).status in (403, 404)
    for path in (
        "/static/../pyproject.toml",
        "/static/%2e%2e/%2e%2e/pyproject.toml",
        "/static/..%2f..%2fpyproject.toml",
        "/static/js/../../index.html",
    ):
        resp = await client.get(path)
        assert resp.status in (403, 404), path
        assert "[project]" not in await resp.text()


async def test_raw_traversal_is_refused(client, web_root):
    """The path goes to the server exactly as written (no client-side normalisation)."""
    (web_root.parent / "pyproject.toml").write_text("[project]\nname = 'secret'\n")
    for target in (
        "/static/../pyproject.toml",
        "/static/../../pyproject.toml",
        "/static/%2e%2e/%2e%2e/pyproject.toml",
        "/static/..%2f..%2fpyproject.toml",
        "/static/js/..%5c..%5c..%5cpyproject.toml",
    ):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
        writer.close()
        status = int(raw.split(b" ", 2)[1])
        assert status in (400, 403, 404), (target, raw[:200])
        assert b"[project]" not in raw, target


async def test_missing_web_root_does_not_break_startup(aiohttp_client, tmp_path):
    app = web.Application()
    web_pages.setup(app, tmp_path / "absent")
    client = await aiohttp_client(app)
    assert (await client.get("/")).status == 404
    assert (await client.get("/static/x.js")).status == 404


def test_default_root_is_the_repositorys_web_client():
    assert web_pages.DEFAULT_ROOT == REPO / "web_client"


# --- TLS -----------------------------------------------------------------------------------


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "facepay.local")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_serve_over_https(tmp_path, models_dir, redis_url):
    cert, key = _self_signed(tmp_path)
    proc, started = spawn_serve(
        *("--data-dir", str(tmp_path / "data"), "--models-dir", str(models_dir)),
        *("--redis-url", redis_url, "--tls-cert", str(cert), "--tls-key", str(key)),
    )
    try:
        url = started["url"]
        assert url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(url + "/healthz", timeout=5, context=context) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.URLError):  # an untrusting client refuses it
            urllib.request.urlopen(url + "/healthz", timeout=5)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("flag", ["--tls-cert", "--tls-key"])
def test_one_tls_flag_alone_exits_2(tmp_path, capsys, monkeypatch, flag):
    for name in SERVER_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    cert, _ = _self_signed(tmp_path)
    code = main(["serve", "--dev", "--port", "0", "--data-dir", str(tmp_path), flag, str(cert)])
    assert code == 2
    assert "--tls-cert and --tls-key" in capsys.readouterr().err


def test_tls_env_alone_exits_2(tmp_path, capsys, monkeypatch):
    for name in SERVER_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FACEPAY_TLS_KEY", str(tmp_path / "key.pem"))
    assert main(["serve", "--dev", "--port", "0", "--data-dir", str(tmp_path)]) == 2
