"""No payment without the passphrase: a long attack on a real server (issue 7).

Enrolled shoppers stand at real terminals (real Redis, models, WebRTC on 127.0.0.1); their
faces match, so every checkout reaches ``confirm``, and then the only thing missing is the
passphrase. Each cycle (a fresh order) sends a batch of attempts that do NOT carry the right
passphrase for the live prompt, and counts every attempt by kind and every reply:

1. ``wrong``: near misses of the passphrase (case, spaces, a character dropped, added or
   changed, look-alike and compatibility characters the server must not normalise away,
   very long, blank) and random strings, with the live prompt id: each is argon2-checked
   and counts toward the lockout, so a cycle sends ``passphrase_attempts`` of them and the
   last one locks the account (the cycle ends ``declined locked``).
2. ``prompt``: the right passphrase with a forged, near-miss, stale (earlier cycle), session
   or other terminal's live prompt id.
3. ``smuggled``: the right passphrase in other message types or fields (phone_digits,
   start_checkout, cancel, ping, enroll_passphrase, unknown types, extra fields, wrong
   shapes), and a passphrase message before the prompt exists or after the checkout ended.
4. ``replay``: exact messages of earlier cycles sent again.

Any ``approved`` at any time fails the test, and afterwards the ledger must hold no payment
(no ``fp:pay``/``fp:payid``/``fp:daily`` key, no ``payment`` audit record). Then a control:
the right passphrase with the live prompt is approved (so the zero above was not a server
that approves nothing), and replaying that approved message pays nothing more.

Limits for this job: the per-terminal passphrase budget, the per-account daily failure
budget and the session-start budget are lifted, the lockout is the shortest the policy
allows (5 s) without back-off, and ``passphrase_attempts`` is 10: the lockout and those
budgets are tested in tests/test_abuse.py; here we count what gets through, so the loop must
be able to keep attacking. ``FACEPAY_ATTACK_ATTEMPTS`` sets how many attempts (default 300;
scripts/attack runs 10,000); ``FACEPAY_ATTACK_REPORT`` names a file for the totals (JSON).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from stream_server.app import REDIS
from tests.e2e import PASSPHRASE, Env, camera_frames, start_env
from tests.terminal import TestTerminal

ATTEMPTS = int(os.environ.get("FACEPAY_ATTACK_ATTEMPTS", "300"))
REPORT = os.environ.get("FACEPAY_ATTACK_REPORT")
#: Argon2-checked wrong guesses per prompt: the last one locks the account.
TRIES = 10
LOCKOUT_S = 5.0
#: Cheap (not argon2-checked) attempts per cycle besides the wrong guesses.
CHEAP_PER_CYCLE = 100
#: (account, enrolment photo, what the camera sees): same person, different photos.
SHOPPERS = (
    ("acct-obama", "faces/obama/obama.jpg", "faces/obama/obama3.jpg"),
    ("acct-kit", "faces/kit_harington/john1.jpeg", "faces/kit_harington/john2.jpeg"),
)
LIFTED = {"count": 100_000, "window_s": 1.0}
#: Replies that answer an attempt (state/faces events are progress, not answers).
ANSWERS = ("error", "wrong_passphrase", "declined", "approved")

pytestmark = pytest.mark.usefixtures("loopback_ice")


def near_misses(rng: random.Random) -> list[str]:
    """Wrong passphrases close to the right one; the server compares exact strings."""
    p = PASSPHRASE
    fixed = [
        p.upper(),
        p.title(),
        p.capitalize(),
        p.swapcase(),
        " " + p,
        p + " ",
        p + "\n",
        "\t" + p,
        p.replace(" ", ""),
        p.replace(" ", "  "),
        p.replace(" ", "\u00a0"),  # no-break space: NFKC would make it the passphrase
        p.replace("42", "\uff14\uff12"),  # fullwidth digits: NFKC would too
        p.replace("o", "\u043e"),  # Cyrillic o
        p.replace("c", "\u0441", 1),  # Cyrillic es
        p.replace("e", "\u0435"),  # Cyrillic ie
        p + "\u0301",  # a combining accent (NFC would fold it onto the 2)
        "\ufeff" + p,  # byte-order mark
        p.replace(" ", "\u200b "),  # zero-width space
        p + "\u200d",
        p[:-1],
        p[1:],
        p + p[-1],
        p[::-1],
        "correct horse 24",
        "correct horse 43",
        "correct horse battery staple",
        p + "x" * (256 - len(p)),  # as long as a message may carry
        p * 16,  # longer: refused unchecked
        "",  # empty: refused unchecked
        " ",
        "\t",
    ]
    dropped = [p[:i] + p[i + 1 :] for i in range(len(p))]
    changed = [p[:i] + chr(ord(c) ^ 1) + p[i + 1 :] for i, c in enumerate(p)]
    added = [p[:i] + rng.choice("aeo 2!") + p[i:] for i in range(len(p) + 1)]
    out = [w for w in fixed + dropped + changed + added if w != p]
    rng.shuffle(out)
    return out


def random_guess(rng: random.Random) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 ABCXYZ!?é中"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))


def endless(analyzer: Any, photo: Any) -> Iterator[Any]:
    """A camera that keeps seeing the shopper (laps of 20 s streams, each a new seed)."""
    for lap in itertools.count():
        yield from camera_frames(analyzer, photo, seconds=20, fps=10, seed=lap)


@dataclass
class Tally:
    """Counts for the report."""

    attempts: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    approved: list[str] = field(default_factory=list)
    cycles: int = 0

    @property
    def total(self) -> int:
        return sum(self.attempts.values())


@dataclass
class Shopper:
    """One terminal attacking one account's checkouts."""

    name: str
    term: TestTerminal
    rng: random.Random
    prompt: str | None = None  # the live prompt id (None between prompts)
    prompts: list[str] = field(default_factory=list)  # every prompt seen, oldest first
    session_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # earlier cycles' messages
    guesses: list[str] = field(default_factory=list)
    ended: dict[str, Any] | None = None  # the current checkout's final event
    locked_until: float | None = None  # from the latest declined ``locked``

    def see(self, event: dict[str, Any], tally: Tally) -> None:
        """Track the session from any event; count any approval wherever it comes."""
        kind = event.get("type")
        if kind == "approved":
            tally.approved.append(self.name)
        elif kind == "declined" and event.get("locked_until"):
            self.locked_until = float(event["locked_until"])
        elif kind == "confirm":
            self.prompt = event["prompt_id"]
            self.prompts.append(event["prompt_id"])
            self.session_id = event.get("session_id")
        elif kind == "state" and event.get("state") in (
            "approved",
            "declined",
            "cancelled",
            "timeout",
        ):
            self.ended = event
            self.prompt = None

    def guess(self) -> str:
        if not self.guesses:
            self.guesses = near_misses(self.rng)
        # Half near misses, half random strings.
        return self.guesses.pop() if self.rng.random() < 0.5 else random_guess(self.rng)


async def attempt(
    shopper: Shopper,
    tally: Tally,
    kind: str,
    message: dict[str, Any],
    keep: bool = True,
    answers: tuple[str, ...] = ANSWERS,
) -> dict[str, Any]:
    """Send one attempt and wait for its answer (one answer per message, by protocol)."""
    tally.attempts[kind] += 1
    await shopper.term.send(message)
    while True:
        try:
            event = await shopper.term.next(timeout=60)
        except TimeoutError:
            # The message itself is not shown: it may carry the passphrase.
            raise AssertionError(f"no answer to a {kind!r} attempt from {shopper.name}") from None
        assert event["type"] != "_closed", f"server closed the socket: {event}"
        shopper.see(event, tally)
        if event["type"] in answers:
            key = event["type"]
            if key in ("error", "declined"):
                key += ":" + str(event.get("code") or event.get("reason"))
            tally.replies[key] += 1
            if keep:
                shopper.history.append(message)
            return event


def forged_prompts(shopper: Shopper, others: list[Shopper]) -> list[str]:
    """Prompt ids that are not the live one: near misses, stale, session, other terminals'."""
    live = shopper.prompt or "q_" + secrets.token_urlsafe(9)
    near = [live.upper(), live.lower(), live + " ", " " + live, live[:-1], live + "A", live[2:]]
    near += ["q_" + secrets.token_urlsafe(9) for _ in range(4)]
    near += ["q_", "*", live[:2] + "0" * (len(live) - 2), live + live]
    stale = shopper.prompts[-4:-1]
    session = [shopper.session_id] if shopper.session_id else []
    theirs = [p for o in others for p in o.prompts[-2:]]
    return [p for p in near + stale + session + theirs if p and p != shopper.prompt]


def smuggled(shopper: Shopper, order: str) -> list[dict[str, Any]]:
    """The right passphrase anywhere but a passphrase message for the live prompt."""
    p, live = PASSPHRASE, shopper.prompt or "q_none"
    return [
        {"type": "phone_digits", "digits": p},
        {"type": "phone_digits", "digits": "0101", "passphrase": p},
        {"type": "phone_digits", "digits": "0101", "prompt_id": live, "passphrase": p},
        {"type": "start_checkout", "amount": "1.00", "order_id": order, "passphrase": p},
        {"type": "start_checkout", "amount": "1.00", "order_id": order + "x", "prompt_id": live},
        {"type": "cancel", "passphrase": p},
        {"type": "cancel", "prompt_id": live, "passphrase": p},
        {"type": "ping", "prompt_id": live, "passphrase": p},
        {"type": "enroll_passphrase", "passphrase": p, "confirm": p},
        {"type": "confirm", "prompt_id": live, "passphrase": p},
        {"type": "approve", "prompt_id": live, "passphrase": p},
        {"type": "passphrase", "prompt_id": live, "passphrase": "x", "password": p},
        {"type": "passphrase", "prompt_id": live, "passphrase": "x", "secret": p},
        {"type": "passphrase", "prompt_id": live, "passphrase": [p]},
        {"type": "passphrase", "prompt_id": live, "passphrase": {"passphrase": p}},
        {"type": "passphrase", "prompt_id": [live], "passphrase": "x"},
        {"type": "passphrase", "passphrase": p},
        {"type": "passphrase", "prompt_id": live},
    ]


async def run_cycle(shopper: Shopper, others: list[Shopper], tally: Tally, n: int) -> None:
    """One checkout: attempts before the prompt, a batch at the prompt, attempts after."""
    rng, term = shopper.rng, shopper.term
    order = f"atk-{shopper.name}-{n}"
    shopper.ended, shopper.prompt = None, None
    history_before = len(shopper.history)
    await term.send({"type": "start_checkout", "amount": "9.99", "order_id": order})
    # Before the prompt exists: the right passphrase with the last prompt and a forged one.
    for pid in [*shopper.prompts[-1:], "q_" + secrets.token_urlsafe(9)]:
        # Only an error can answer it: a session outcome here is the session's, not its.
        message = {"type": "passphrase", "prompt_id": pid, "passphrase": PASSPHRASE}
        await attempt(shopper, tally, "smuggled", message, answers=("error", "approved"))
    while shopper.prompt is None and shopper.ended is None:
        shopper.see(await term.expect("confirm", "state", timeout=60), tally)
    if shopper.ended is not None:  # no prompt this time (e.g. still locked): next cycle
        tally.outcomes[f"{shopper.name}:{shopper.ended.get('reason')}"] += 1
        return
    cheap: list[tuple[str, dict[str, Any]]] = []
    for pid in forged_prompts(shopper, others):
        cheap.append(("prompt", {"type": "passphrase", "prompt_id": pid, "passphrase": PASSPHRASE}))
    cheap += [("smuggled", m) for m in smuggled(shopper, order)]
    old = shopper.history[:history_before]
    cheap += [("replay", m) for m in rng.sample(old, min(len(old), 50))]
    rng.shuffle(cheap)
    cheap = cheap[:CHEAP_PER_CYCLE]
    # The wrong guesses go between the cheap ones; the last message of the batch is a wrong
    # guess, so the account locks at the end of the cycle (unless the prompt was cut short).
    size = len(cheap) + TRIES
    wrong_at = set(rng.sample(range(size - 1), TRIES - 1)) | {size - 1}
    rest = iter(cheap)
    batch = [("wrong", {}) if i in wrong_at else next(rest) for i in range(size)]
    for kind, message in batch:
        if shopper.ended is not None:
            break
        if kind == "wrong":
            live = shopper.prompt or "q_gone"
            message = {"type": "passphrase", "prompt_id": live, "passphrase": shopper.guess()}
        await attempt(shopper, tally, kind, message)
    if shopper.ended is None:  # e.g. a guess the protocol refused unchecked: stop here
        await term.send({"type": "cancel"})  # not an attempt: it has no answer but the end
        while shopper.ended is None:
            shopper.see(await term.expect("state", timeout=30), tally)
    tally.outcomes[f"{shopper.name}:{shopper.ended.get('reason')}"] += 1
    # After the end: the right passphrase with the prompt that was live a moment ago.
    await attempt(
        shopper,
        tally,
        "smuggled",
        {"type": "passphrase", "prompt_id": shopper.prompts[-1], "passphrase": PASSPHRASE},
    )
    tally.cycles += 1


async def wait_until(t: float) -> None:
    """Sleep until wall-clock ``t`` (a lockout's end); the terminal's socket stays open."""
    await asyncio.sleep(max(0.0, t - time.time()))


async def attack(shopper: Shopper, others: list[Shopper], tally: Tally, goal: int) -> None:
    """Cycles until the whole run has sent ``goal`` attempts; waits out each lockout."""
    n = 0
    while tally.total < goal:
        await run_cycle(shopper, others, tally, n)
        n += 1
        if shopper.locked_until is not None:
            await wait_until(shopper.locked_until + 0.05)
            shopper.locked_until = None
        shopper.term.events.clear()  # keep memory flat over a long run (approvals are counted)


@pytest.fixture
async def attack_env(aiohttp_server, redis_url, models_dir):  # type: ignore[no-untyped-def]
    """A real server with the attack's policy and limits (see the module docstring)."""
    env = await start_env(
        aiohttp_server,
        redis_url,
        models_dir,
        limits={
            "lockout_backoff": 1.0,
            "passphrase_attempts_per_terminal": LIFTED,
            "passphrase_failures_per_account": LIFTED,
            "session_starts_per_terminal": LIFTED,
        },
        passphrase_attempts=TRIES,
        lockout_s=LOCKOUT_S,
        session_timeout_s=60.0,
    )
    yield env
    await env.close()


async def ledger_keys(env: Env) -> list[bytes]:
    redis = env.app[REDIS]
    return [
        k
        for pattern in ("fp:pay:*", "fp:payid:*", "fp:daily:*")
        async for k in redis.scan_iter(pattern)
    ]


async def test_no_payment_without_the_passphrase(attack_env, analyzer, photo):
    env = attack_env
    shoppers: list[Shopper] = []
    for i, (account, enrol, seen) in enumerate(SHOPPERS):
        await env.enroll(account, account, f"+1202555010{i}", photo(enrol))
        _, token = await env.store.add_terminal(env.merchant.merchant_id, "checkout")
        term = await env.terminal(token=token)
        await term.start_video(endless(analyzer, photo(seen)))
        shoppers.append(Shopper(account, term, random.Random(i)))
    tally = Tally()
    started = time.monotonic()
    await asyncio.gather(
        *[attack(s, [o for o in shoppers if o is not s], tally, ATTEMPTS) for s in shoppers]
    )
    duration = time.monotonic() - started
    audit = await env.store.read_audit(count=200_000)
    payments = await env.payments()
    leftovers = await ledger_keys(env)
    totals = {
        "attempts": tally.total,
        "by_kind": dict(sorted(tally.attempts.items())),
        "argon2_checked": tally.replies["wrong_passphrase"] + tally.replies["declined:locked"],
        "approved": len(tally.approved),
        "replies": dict(sorted(tally.replies.items())),
        "cycles": tally.cycles,
        "cycle_outcomes": dict(sorted(tally.outcomes.items())),
        "declined": sum(v for k, v in tally.replies.items() if k.startswith("declined")),
        "locked": tally.replies["declined:locked"],
        "errors": sum(v for k, v in tally.replies.items() if k.startswith("error")),
        "payments": len(payments),
        "ledger_keys": len(leftovers),
        "payment_audit_records": sum(1 for r in audit if r.get("event") == "payment"),
        "passphrase_failed_audit_records": sum(
            1 for r in audit if r.get("event") == "passphrase_failed"
        ),
        "duration_s": round(duration, 1),
        "attempts_per_s": round(tally.total / duration, 1),
    }
    print("\nattack totals: " + json.dumps(totals))
    if REPORT:
        with open(REPORT, "w") as out:
            json.dump(totals, out)
    assert tally.approved == [], totals
    assert payments == [] and leftovers == [], totals
    assert totals["payment_audit_records"] == 0, totals
    assert tally.total >= ATTEMPTS
    # Every wrong guess that reached argon2 was counted against the account (audited).
    assert totals["passphrase_failed_audit_records"] == totals["argon2_checked"], totals
    # Every shopper's face matched (the attack happened at a live prompt, not before one).
    assert tally.replies["wrong_passphrase"] > 0 and tally.attempts["wrong"] > 0

    # Control: the right passphrase at the live prompt pays, so zero above means refused,
    # not a server that approves nothing. Then replaying that message pays nothing more.
    shopper = shoppers[0]
    locked = await env.store.locked_until(shopper.name)
    if locked is not None:
        await wait_until(locked + 0.05)
    shopper.ended, shopper.prompt = None, None
    await shopper.term.send({"type": "start_checkout", "amount": "9.99", "order_id": "control"})
    confirm = await shopper.term.expect("confirm", timeout=60)
    right = {"type": "passphrase", "prompt_id": confirm["prompt_id"], "passphrase": PASSPHRASE}
    await shopper.term.send(right)
    assert (await shopper.term.expect("approved", "declined"))["type"] == "approved"
    await shopper.term.until_end()
    before = len(tally.approved)
    for _ in range(5):  # the ended session refuses it
        reply = await attempt(shopper, tally, "replay", right, keep=False)
        assert reply["type"] == "error", reply
    await shopper.term.send({"type": "start_checkout", "amount": "9.99", "order_id": "control-2"})
    await shopper.term.expect("confirm", timeout=60)
    for _ in range(5):  # and so does the next one (its prompt is new)
        reply = await attempt(shopper, tally, "replay", right, keep=False)
        assert reply["type"] == "error", reply
    await shopper.term.send({"type": "cancel"})
    await shopper.term.until_end()
    assert len(tally.approved) == before
    assert len(await env.payments()) == 1
