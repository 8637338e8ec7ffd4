"""The browser pages: ``web_client/`` served with strict security headers.

``GET /`` (index), ``/checkout``, ``/gate``, ``/enroll`` answer the matching HTML file and
``/static/`` the assets (no directory listing, no path traversal: aiohttp's static route
resolves every path inside its folder). A page file that does not exist yet answers 404;
start-up never depends on the web client being there. The web root defaults to the
repository's ``web_client/`` and can be set with ``setup(app, root=...)``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

#: The repository's web client (next to the ``stream_server`` package).
DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "web_client"
WEB_ROOT = web.AppKey("web_root", Path)

PAGES = {
    "/": "index.html",
    "/checkout": "checkout.html",
    "/gate": "gate.html",
    "/enroll": "enroll.html",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# frame-ancestors / X-Frame-Options: no other site may frame the payment or enrolment
# pages (clickjacking a Pay or a consent). The pages post no forms and set no base.
# connect-src: {connect} is filled per request (``security_headers``).
CSP_TEMPLATE = (
    "default-src 'self'; connect-src {connect}; img-src 'self' data: blob:; "
    "media-src 'self' blob:; style-src 'self'; script-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)

OTHER_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "camera=(self)",
}

# A Host the CSP may name: a DNS name or IPv4 address, or a bracketed IPv6 address, with an
# optional port. Anything else (spaces, ';', quotes) could add directives to the policy.
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def security_headers(request: web.Request) -> dict[str, str]:
    """The pages' security headers for ``request``.

    The pages open their WebSocket to ``ws[s]://<their own host>/ws``. CSP level 3 lets
    ``'self'`` cover that, but browsers that still follow CSP level 2 (where ``'self'``
    never matches ``ws:``) would refuse the socket, so it is allowed by name: only this
    Host, not WebSockets to any host (an injected script could otherwise send what the
    page shows anywhere). The server's Origin check compares with the same Host header
    (``ws_messages.origin_allowed``). A Host that is not a plain host[:port] gets
    ``'self'`` alone.
    """
    host = request.host
    connect = f"'self' ws://{host} wss://{host}" if _HOST.fullmatch(host) else "'self'"
    return {"Content-Security-Policy": CSP_TEMPLATE.format(connect=connect), **OTHER_HEADERS}


def _page(filename: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        path = request.app[WEB_ROOT] / filename
        if not path.is_file():
            raise web.HTTPNotFound(text="page not found", headers=security_headers(request))
        response = web.FileResponse(path, headers=security_headers(request))
        response.content_type = "text/html"
        return response

    return handler


@web.middleware
async def _static_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers on static assets too (nosniff matters most there)."""
    response = await handler(request)
    if request.path.startswith("/static/"):
        for name, value in security_headers(request).items():
            response.headers.setdefault(name, value)
    return response


def setup(app: web.Application, root: str | Path | None = None) -> None:
    """Register the pages and ``/static/`` under ``root`` (default: the repo's web_client)."""
    web_root = Path(root) if root is not None else DEFAULT_ROOT
    app[WEB_ROOT] = web_root
    for route, filename in PAGES.items():
        app.router.add_get(route, _page(filename))
    static = web_root / "static"
    # add_static refuses a missing folder at registration; serve 404s until it exists.
    if static.is_dir():
        app.router.add_static("/static/", static, show_index=False, follow_symlinks=False)
    app.middlewares.append(_static_headers)
