"""What a terminal tells the person in front of it about their face, by quality reason.

Enrolment and checkout read the same quality reasons (``pipeline.quality``) but hint on
different sets of them: an enrolment coaches the person through every reason, while a
checkout hints only where the shopper would otherwise wait for the session's timeout,
because the other reasons (too small, blurry, turned away) pass on their own as a shopper
walks up to the till and a hint for each would flicker.
"""

from __future__ import annotations

#: Enrolment: quality reason -> hint, first match wins.
ENROL_HINTS: tuple[tuple[str, str], ...] = (
    # Nothing the person can do helps an upside-down picture (a camera mounted upside down).
    ("upside_down", "upside_down"),
    ("too_close", "farther"),
    ("cut_off", "move_to_centre"),
    ("too_small", "closer"),
    ("too_dark", "more_light"),
    ("too_bright", "less_light"),
    ("turned_away", "look_at_camera"),
    ("head_tilted", "look_at_camera"),
    ("blurry", "hold_still"),
)

#: Checkout: only the reasons that keep every frame from counting as evidence for as long
#: as they last (a face too close for liveness, one the frame's edge cuts off, a camera
#: mounted upside down), so the shopper, or staff, learns why nothing happens.
CHECKOUT_HINTS: tuple[tuple[str, str], ...] = (
    ("upside_down", "upside_down"),
    ("too_close", "farther"),
    ("cut_off", "move_to_centre"),
)


def _first(reasons: tuple[str, ...], table: tuple[tuple[str, str], ...]) -> str | None:
    for reason, hint in table:
        if reason in reasons:
            return hint
    return None


def enrol_hint(reasons: tuple[str, ...]) -> str:
    """The enrolment hint for a face's quality reasons (``ok`` when none applies)."""
    return _first(reasons, ENROL_HINTS) or "ok"


def checkout_hint(reasons: tuple[str, ...]) -> str | None:
    """The checkout hint for a face's quality reasons (None when none applies)."""
    return _first(reasons, CHECKOUT_HINTS)
