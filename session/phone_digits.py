"""The budget of wrong phone digits per enrolled person, across terminals and servers.

An ambiguous search (a look-alike within the margin) asks for the last four phone digits.
``limits.phone_digits_per_terminal`` bounds the answers one kiosk may send; this bounds the
wrong answers counted against each person the ambiguous search named, wherever they were
sent from, so a look-alike who moves between kiosks still cannot walk through the 10,000
values. Counted in Redis (``RateLimiter``), so every server shares the budget.

Once a person's budget is spent, a search naming them is declined ``ambiguous`` before any
digits are checked: a right guess must not get through either. The price, accepted: a
look-alike can spend their twin's budget, and the twin's own ambiguous checkouts are then
declined until the window ends (a person is only ever asked for digits when someone enrolled
looks like them).

A live enrolment's duplicate check compares the face only with the enrolled people whose
phone ends in the digits given (``session.enrollment.refuse_duplicate``), so its answer,
``already_enrolled`` or a new account, would confirm or deny a look-alike's guess of those
digits. The same budget bounds it: each such enrolment spends one answer of every
look-alike the face matches (``lookalikes``, ``spend_answer``), right or wrong, before the
digits are compared, and once a look-alike's budget is spent it is declined ``ambiguous``.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.errors import RateLimited
from pipeline.types import FloatArray
from session.config import Limit
from session.directory import Directory
from session.ratelimit import RateLimiter

BUCKET = "phone_digit_misses"


def ambiguous_subjects(directory: Directory, probe: FloatArray) -> list[str]:
    """The subjects an ambiguous search could not tell apart: the best and every other
    within ``match.margin`` of it."""
    match = directory.match
    found = directory.gallery.search(probe, k=match.top_k)
    if not found:
        return []
    floor = found[0].score - match.margin
    return [m.subject_id for m in found if m.score >= floor]


#: The most look-alikes an enrolment names per template. A face matching this many enrolled
#: subjects is declined: otherwise someone could enrol their own face under new accounts
#: until the person whose digits they guess drops out of the subjects named. At most 16, so
#: that a deep index search (``ann_recheck_pool`` 256 templates) can find this many subjects
#: of up to 10 templates each (the most an enrolment keeps); at a million templates a
#: face's impostors above the threshold number about one.
LOOKALIKE_LIMIT = 16


def lookalikes(directory: Directory, templates: Sequence[FloatArray]) -> list[str] | None:
    """The enrolled subjects any of ``templates`` matches at ``match.threshold`` or above,
    whatever their phone digits: those an enrolment's duplicate check would compare the
    digits of. None when a template matches ``LOOKALIKE_LIMIT`` or more (a crowd that could
    hide one). Searched deep, since a look-alike the index misses escapes the budget."""
    threshold = directory.match.threshold
    named: list[str] = []
    for template in templates:
        found = directory.gallery.search(template, k=LOOKALIKE_LIMIT, deep=True)
        above = [m.subject_id for m in found if m.score >= threshold]
        if len(above) >= LOOKALIKE_LIMIT:
            return None
        named += [sid for sid in above if sid not in named]
    return named


async def budget_spent(limiter: RateLimiter, subjects: Sequence[str], limit: Limit) -> bool:
    """Whether any of ``subjects`` has no wrong answers left in this window."""
    for sid in subjects:
        if await limiter.remaining(BUCKET, sid, limit) <= 0:
            return True
    return False


async def spend_answer(limiter: RateLimiter, subjects: Sequence[str], limit: Limit) -> bool:
    """Count one answer against each of ``subjects``; False if any budget was already spent.

    One atomic count per subject (``RateLimiter.hit``), so that answers given at the same
    moment on several kiosks cannot all pass a check made before any of them is counted."""
    spent = False
    for sid in subjects:
        try:
            await limiter.hit(BUCKET, sid, limit)
        except RateLimited:
            spent = True
    return not spent


async def count_miss(limiter: RateLimiter, subjects: Sequence[str], limit: Limit) -> None:
    """Count one wrong answer against each of ``subjects``. Whether a budget was spent
    already does not matter here: the next ``budget_spent`` reads the count."""
    await spend_answer(limiter, subjects, limit)
