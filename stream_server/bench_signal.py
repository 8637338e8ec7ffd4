"""WebSocket-only terminals for ``facepay bench --ws-terminals`` (the load test)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from stream_server.bench_terminal import BenchTerminal

#: A WebSocket-only terminal holds each checkout this long, then waits this long.
SIGNAL_HOLD_S = 1.0
SIGNAL_GAP_S = 1.0


class SignallingTerminal(BenchTerminal):
    """A kiosk on the WebSocket only (no camera yet): checkouts that are cancelled.

    The load test's realistic share of terminals without video: each cycle starts a checkout,
    waits for the server to say it is scanning, cancels, and expects ``cancelled``; a ping in
    between. Anything else (an error, a closed socket, no answer) is reported as an error.
    """

    async def _work(self, ws: aiohttp.ClientWebSocketResponse, end: float) -> None:
        """Cycle checkout/cancel until ``end``."""
        n = 0
        while time.monotonic() < end:
            n += 1
            await self._cycle(ws, f"ws-{self.spec['run']}-{self.index}-{n}")
            await asyncio.sleep(SIGNAL_GAP_S)

    async def _cycle(self, ws: aiohttp.ClientWebSocketResponse, order: str) -> None:
        t0 = time.monotonic()
        rec: dict[str, Any] = {"terminal": self.index, "order_id": order, "video": False}
        try:
            await ws.send_json({"type": "ping"})
            await self._expect({"pong"}, 10.0)
            start = {"type": "start_checkout", "amount": self.spec["amount"], "order_id": order}
            await ws.send_json(start)
            await self._until_state({"scanning"}, 10.0)
            await asyncio.sleep(SIGNAL_HOLD_S)
            await ws.send_json({"type": "cancel"})
            await self._until_state({"cancelled"}, 10.0)
            rec["outcome"] = "cancelled"
        except TimeoutError:
            rec["outcome"], rec["reason"] = "error", "no_answer"
        except _Unexpected as exc:
            rec["outcome"], rec["reason"] = "error", str(exc)
        rec["end_ms"] = round((time.monotonic() - t0) * 1000, 1)
        print(json.dumps(rec), flush=True)
        if rec.get("reason") == "closed":
            raise ConnectionError("server closed the WebSocket")

    async def _until_state(self, states: set[str], timeout: float) -> None:
        while True:
            event = await self._expect({"state", "error", "declined", "_closed"}, timeout)
            if event["type"] == "_closed":
                raise _Unexpected("closed")
            if event["type"] != "state":
                raise _Unexpected(f"{event['type']}:{event.get('code') or event.get('reason')}")
            if event.get("state") in states:
                return


class _Unexpected(Exception):
    pass
