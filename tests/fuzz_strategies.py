"""Hypothesis strategies for tests/test_fuzz.py: hostile terminal messages, admin HTTP
requests and SDP offers. Each strategy draws ``(payload, expect_error)`` or plain payloads.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

# --- values ---------------------------------------------------------------------------------

#: Strings that have broken parsers elsewhere: injections, unicode edge cases, formats.
NASTY_STRINGS = [
    "",
    " ",
    "\x00",
    "\u202e",
    "\ufeff",
    "\ud7ff",
    "１２.５０",
    "12.50",
    "-1",
    "0",
    "1e999999",
    "NaN",
    "Infinity",
    "0x10",
    "9" * 400,
    "' OR 1=1 --",
    "<script>alert(1)</script>",
    "../../etc/passwd",
    "%00",
    "fp:audit",
    "*",
    "\r\nSET fp:x 1\r\n",
    "{{7*7}}",
    "$(reboot)",
    "CNY",
    "cny",
    "USD",
    "a" * 65,
    "true",
]


def huge_text(min_size: int = 1_000, max_size: int = 120_000) -> st.SearchStrategy[str]:
    """A long string built by repetition (hypothesis draws small, we multiply)."""
    return st.builds(
        lambda unit, n: (unit * (n // max(1, len(unit)) + 1))[:n],
        st.text(min_size=1, max_size=8),
        st.integers(min_size, max_size),
    )


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(NASTY_STRINGS)
)

json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=15,
)

hostile_values = json_values | huge_text(100, 5_000)


def nested(depth: int, kind: str) -> str:
    """JSON nested ``depth`` deep (arrays or objects): parsers that recurse run out of stack."""
    if kind == "array":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


deep_json = st.builds(nested, st.integers(100, 30_000), st.sampled_from(["array", "object"]))


def dumps(value: Any) -> str:
    """JSON text; NaN and Infinity as Python writes them (which json.loads accepts too)."""
    return json.dumps(value, allow_nan=True)


# --- terminal messages -------------------------------------------------------------------------

#: Field names per message type (docs/protocol.md), to build valid-shaped messages.
MESSAGE_FIELDS: dict[str, list[str]] = {
    "hello": ["token"],
    "offer": ["sdp", "sdp_type"],
    "start_checkout": ["amount", "currency", "order_id"],
    "passphrase": ["prompt_id", "passphrase"],
    "phone_digits": ["digits"],
    "start_enroll": ["consent", "account_id", "name", "phone"],
    "enroll_passphrase": ["passphrase", "confirm"],
    "cancel": [],
    "ping": [],
}


#: Valid values per field: mixed in so that inputs also reach past validation (sessions
#: start, prompts are answered, enrolments capture) and the states behind it get fuzzed.
PLAUSIBLE: dict[str, list[Any]] = {
    "token": ["fpt_not-a-real-token"],
    "sdp_type": ["offer"],
    "amount": ["12.50", 5, 0.5, "0.01"],
    "currency": ["CNY", None],
    "order_id": ["o-1", "A.b:c_9"],
    "prompt_id": ["q_abc"],
    "passphrase": ["correct horse 42"],
    "confirm": ["correct horse 42"],
    "digits": ["1234", "0000"],
    "consent": [True],
    "account_id": ["acct-1", "a@b.c"],
    "name": ["Test Person"],
    "phone": ["+8613800001234"],
}


@st.composite
def shaped_message(draw: st.DrawFn) -> dict[str, Any]:
    """A message of a real type whose fields hold hostile values (some dropped or added)."""
    kind = draw(st.sampled_from(sorted(MESSAGE_FIELDS)))
    msg: dict[str, Any] = {"type": kind}
    for name in MESSAGE_FIELDS[kind]:
        roll = draw(st.integers(0, 9))
        if roll == 0:
            continue  # a missing field
        if roll <= 6 and name in PLAUSIBLE:
            msg[name] = draw(st.sampled_from(PLAUSIBLE[name]))
        else:
            msg[name] = draw(hostile_values)
    if draw(st.integers(0, 5)) == 0:
        msg[draw(st.text(min_size=1, max_size=12))] = draw(json_values)
    return msg


#: A terminal message: (kind, payload); kind "text" or "binary", payload str or bytes, plus
#: whether it must be answered with an error (it cannot be a valid message).
ws_inputs = st.one_of(
    shaped_message().map(lambda m: ("text", dumps(m), False)),
    json_values.map(lambda v: ("text", dumps(v), not (isinstance(v, dict) and "type" in v))),
    st.builds(
        lambda d, t: ("text", dumps({**d, "type": t}), True),
        st.dictionaries(st.text(max_size=10), json_values, max_size=4),
        json_values.filter(lambda v: not isinstance(v, str)),
    ),
    st.text(max_size=200).filter(lambda t: not _is_json(t)).map(lambda t: ("text", t, True)),
    deep_json.map(lambda t: ("text", t, True)),
    huge_text(70_000, 200_000).map(lambda t: ("text", dumps({"type": "ping", "pad": t}), True)),
    st.binary(max_size=300).map(lambda b: ("binary", b, True)),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999999", "9" * 5000, "[]", "null"]).map(
        lambda t: ("text", t, True)
    ),
)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


#: A first message instead of a valid hello: never authenticates.
hello_inputs = st.one_of(
    st.builds(lambda t: {"type": "hello", "token": t}, hostile_values).map(dumps),
    shaped_message().map(dumps),
    json_values.map(dumps),
    st.text(max_size=200),
    deep_json,
    st.builds(lambda t: {"type": "hello", "token": t}, huge_text(200, 2_000)).map(dumps),
).map(lambda t: ("text", t)) | st.binary(max_size=200).map(lambda b: ("binary", b))


# --- admin HTTP ------------------------------------------------------------------------------

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
ROUTES = [
    "/api/merchants",
    "/api/terminals",
    "/api/terminals/{x}",
    "/api/terminals/{x}/rotate",
    "/api/accounts",
    "/api/accounts/{x}",
    "/api/payments/{x}",
    "/api/merchants/{x}/orders/{y}",
    "/api/{x}",
    "/api/{x}/{y}",
]

segment = st.one_of(st.text(min_size=1, max_size=30), st.sampled_from(NASTY_STRINGS[1:])).map(
    lambda s: quote(s, safe="") or "x"
)


@st.composite
def http_request(draw: st.DrawFn, admin_token: str) -> dict[str, Any]:
    """An admin API request: method, path, headers, body; ``authorised`` if the token is right."""
    route = draw(st.sampled_from(ROUTES))
    path = route.replace("{x}", draw(segment)).replace("{y}", draw(segment))
    auth_kind = draw(st.sampled_from(["none", "right", "wrong", "garbage", "scheme"]))
    headers: dict[str, str] = {}
    if auth_kind == "right":
        headers["Authorization"] = f"Bearer {admin_token}"
    elif auth_kind == "wrong":
        headers["Authorization"] = "Bearer " + draw(st.sampled_from([admin_token[:-1], "x", ""]))
    elif auth_kind == "garbage":
        headers["Authorization"] = draw(header_text)
    elif auth_kind == "scheme":
        scheme = draw(st.sampled_from(["Basic", "bearer", "BEARER", "Token"]))
        headers["Authorization"] = f"{scheme} {admin_token}"
        # RFC 7235: the scheme is case-insensitive, so "bearer" is the right token too.
        auth_kind = "right" if scheme.lower() == "bearer" else auth_kind
    if draw(st.booleans()):
        headers["Content-Type"] = draw(
            st.sampled_from(
                ["application/json", "multipart/form-data; boundary=xyz", "text/plain", "x/y; a=b"]
            )
            | header_text
        )
    body_kind = draw(
        st.sampled_from(["none", "json", "shaped", "raw", "deep", "huge", "multipart"])
    )
    body: bytes | None = None
    if body_kind == "json":
        body = dumps(draw(json_values)).encode()
    elif body_kind == "shaped":
        fields = draw(st.sampled_from([["name"], ["merchant_id", "mode"]]))
        body = dumps({f: draw(hostile_values) for f in fields}).encode()
    elif body_kind == "raw":
        body = draw(st.binary(max_size=500))
    elif body_kind == "deep":
        body = draw(deep_json).encode()
    elif body_kind == "huge":
        body = b"x" * draw(st.integers(16 * 1024, 200_000))
    elif body_kind == "multipart":
        body = draw(multipart_body())
        headers["Content-Type"] = "multipart/form-data; boundary=fuzzb"
    return {
        "method": draw(st.sampled_from(METHODS)),
        "path": path,
        "headers": headers,
        "body": body,
        "authorised": auth_kind == "right",
    }


#: Header values an HTTP client can send: latin-1 printable, no CR/LF.
header_text = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=255, blacklist_characters="\x7f"),
    max_size=60,
).map(str.strip)


@st.composite
def multipart_body(draw: st.DrawFn) -> bytes:
    """A multipart body (boundary ``fuzzb``) with hostile fields and files."""
    names = ["account_id", "name", "phone", "passphrase", "consent", "image", "other", ""]
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from(names))
        value = draw(st.binary(max_size=200) | st.sampled_from([b"true", b"alice", b"\xff\xfe"]))
        parts.append(
            b'--fuzzb\r\nContent-Disposition: form-data; name="'
            + name.encode()
            + b'"'
            + (b'; filename="f.jpg"' if name == "image" else b"")
            + b"\r\n\r\n"
            + value
            + b"\r\n"
        )
    tail = draw(st.sampled_from([b"--fuzzb--\r\n", b"", b"--fuzzb", b"garbage"]))
    return b"".join(parts) + tail


#: Raw bytes on a fresh TCP connection: broken request lines, headers, encodings.
raw_http = st.one_of(
    st.binary(max_size=400),
    st.builds(
        lambda method, path, header, value, body: (
            method
            + b" "
            + path
            + b" HTTP/1.1\r\nHost: x\r\n"
            + header
            + b": "
            + value
            + b"\r\n\r\n"
            + body
        ),
        st.sampled_from([b"GET", b"POST", b"DELETE", b"\xff", b"G ET", b""]),
        st.sampled_from([b"/api/merchants", b"/healthz", b"/ws", b"/api/%ff", b"*", b"/\x00"])
        | st.binary(max_size=40),
        st.sampled_from([b"Authorization", b"Content-Length", b"Transfer-Encoding", b"Upgrade"]),
        st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
        | st.sampled_from(
            [b"Bearer \xff\xfe", b"-1", b"99999999999999999999", b"chunked", b"websocket"]
        ),
        st.binary(max_size=200),
    ),
)


# --- SDP ------------------------------------------------------------------------------------

_LOOPBACK_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ 127\.0\.0\.1 ")


def loopback_only(sdp: str) -> str:
    """Drop ICE candidates that do not point at 127.0.0.1: the fuzz never reaches out."""
    lines = sdp.split("\n")
    kept = [
        line
        for line in lines
        if not line.startswith("a=candidate") or _LOOPBACK_CANDIDATE.match(line.rstrip("\r"))
    ]
    return "\n".join(kept)


@st.composite
def mutated_sdp(draw: st.DrawFn, base: str) -> str:
    """A real offer with 1-4 structural mutations."""
    eol = "\r\n"
    lines = base.rstrip(eol).split(eol)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(
                [
                    "delete",
                    "duplicate",
                    "swap",
                    "replace",
                    "insert",
                    "numbers",
                    "media",
                    "truncate",
                    "eol",
                    "flip",
                ]
            )
        )
        i = draw(st.integers(0, len(lines) - 1)) if lines else 0
        if not lines:
            lines = [draw(st.text(max_size=30))]
        elif op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "replace":
            lines[i] = draw(st.text(max_size=60))
        elif op == "insert":
            key = draw(
                st.sampled_from(["a=", "m=", "c=", "b=", "k=", "a=fmtp:", "a=rtpmap:", "a=ssrc:"])
            )
            lines.insert(i, key + draw(st.text(max_size=40)))
        elif op == "numbers":
            value = draw(
                st.sampled_from(["0", "-1", "65536", "4294967296", "99999999999999999999", "x"])
            )
            lines[i] = re.sub(r"\d+", value, lines[i], count=draw(st.integers(1, 3)))
        elif op == "media":
            lines = [
                re.sub(
                    r"^m=video",
                    "m=" + draw(st.sampled_from(["audio", "application", "text", "video"])),
                    x,
                )
                for x in lines
            ]
        elif op == "truncate":
            text = eol.join(lines)
            text = text[: draw(st.integers(0, len(text)))]
            lines = text.split(eol)
        elif op == "eol":
            eol = draw(st.sampled_from(["\n", "\r", "\r\n\r\n", "\r\n"]))
        elif op == "flip" and lines[i]:
            k = draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = lines[i][:k] + draw(st.characters()) + lines[i][k + 1 :]
    return loopback_only(eol.join(lines) + eol)


def sdp_inputs(base: str) -> st.SearchStrategy[str]:
    """Mutated real offers, and garbage."""
    return st.one_of(
        mutated_sdp(base),
        mutated_sdp(base),
        st.text(min_size=1, max_size=300),
        st.lists(
            st.text(alphabet=string.ascii_letters + "=:/ 0123456789", max_size=40), max_size=20
        ).map(lambda ls: "\r\n".join(["v=0", *ls]) + "\r\n"),
    )
