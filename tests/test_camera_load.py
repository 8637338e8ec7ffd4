"""LoadPacer: a checkout camera's rate from how many of its frames the server analysed."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from session.camera_load import MIN_WINDOW_FRAMES, CheckoutLoad, LoadPacer, pacer_for
from session.config import FacePayConfig, LoadPacingConfig


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Slot:
    """A frame slot's running counts, fed window by window."""

    def __init__(self, pacer: LoadPacer) -> None:
        self.pacer, self.received, self.taken = pacer, 0, 0

    def feed(self, counts: list[tuple[int, int]]) -> list[float | None]:
        """Each window's (received, taken) added to the counts; the pacer's answers."""
        answers = []
        for got, took in counts:
            self.received, self.taken = self.received + got, self.taken + took
            answers.append(self.pacer.update(self.received, self.taken))
        return answers


def test_keeps_the_rate_while_the_analysis_keeps_up_or_nearly():
    pacer = LoadPacer(LoadPacingConfig(), 15.0)
    slot = Slot(pacer)
    # All analysed, then 76 % (8 terminals on 2 cores), then 40 %: nothing to change.
    assert slot.feed([(15, 15), (15, 11), (15, 6)]) == [None, None, None]
    assert pacer.fps == 15.0


def test_one_low_window_is_not_enough():
    """At the target load single windows dip below a third; two in a row are needed."""
    pacer = LoadPacer(LoadPacingConfig(), 15.0)
    slot = Slot(pacer)
    assert slot.feed([(15, 4), (15, 8), (15, 3), (15, 9)]) == [None] * 4
    assert pacer.fps == 15.0


def test_lowers_to_what_was_analysed_with_headroom_then_holds():
    pacer = LoadPacer(LoadPacingConfig(), 15.0)
    slot = Slot(pacer)
    # 4 then 4 of 15 analysed (16 terminals): ask for 1.5 x 8/30 x 15 = 6 frames a second.
    assert slot.feed([(15, 4), (15, 4)]) == [None, 6.0]
    # At 6 a second (windows of 6 frames) half are analysed: between the thresholds, hold.
    assert pacer.window_frames == 6
    assert slot.feed([(6, 3), (6, 3)]) == [None, None]
    assert pacer.fps == 6.0


def test_never_below_the_floor_even_when_nothing_is_analysed():
    pacer = LoadPacer(LoadPacingConfig(min_fps=5.0), 15.0)
    slot = Slot(pacer)
    assert slot.feed([(15, 0), (15, 0)]) == [None, 5.0]
    assert slot.feed([(5, 0), (5, 0)]) == [None, None]  # already there: nothing new to ask


def test_never_above_the_cap_even_with_a_higher_floor():
    pacer = LoadPacer(LoadPacingConfig(min_fps=10.0), 8.0)
    slot = Slot(pacer)
    assert slot.feed([(8, 0), (8, 0)]) == [None, None]
    assert pacer.fps == 8.0


def test_raises_in_steps_of_a_second_each_back_to_the_cap_and_no_further():
    pacer = LoadPacer(LoadPacingConfig(), 15.0)
    slot = Slot(pacer)
    assert slot.feed([(15, 0), (15, 0)]) == [None, 5.0]
    # Windows of 5, 8 and 11 frames: about a second each at the rate asked for.
    assert slot.feed([(5, 5), (8, 8), (11, 10), (15, 15)]) == [7.5, 11.2, 15.0, None]
    assert pacer.fps == 15.0


def test_waits_for_a_whole_window_of_received_frames():
    """A checkout paused between shoppers receives nothing: a window spans checkouts, and a
    few frames are no evidence of load."""
    pacer = LoadPacer(LoadPacingConfig(window_s=1.0, lower_after=1), 15.0)
    assert pacer.update(14, 0) is None
    assert pacer.update(15, 0) == 5.0
    assert pacer.window_frames == 5
    # However short the window in seconds, never fewer than MIN_WINDOW_FRAMES frames.
    short = LoadPacer(LoadPacingConfig(window_s=0.2, lower_after=1), 5.0)
    assert short.window_frames == MIN_WINDOW_FRAMES
    assert short.update(MIN_WINDOW_FRAMES - 1, 0) is None


def test_a_new_connection_starts_from_the_slots_counts_now():
    """The frame slot outlives video connections: an earlier connection's frames (here 300
    received, 30 analysed) are no evidence of the new one's load."""
    pacer = pacer_for(FacePayConfig(), "checkout", received=300, taken=30)
    assert pacer is not None
    assert pacer.update(315, 45) is None and pacer.update(330, 60) is None
    assert pacer.fps == 15.0
    # From zero, the same counts would be two low windows in a row.
    fresh = LoadPacer(LoadPacingConfig(), 15.0)
    assert fresh.update(15, 0) is None and fresh.update(330, 60) == 5.0


def test_only_checkout_cameras_with_a_cap_are_paced():
    cfg = FacePayConfig()
    assert isinstance(pacer_for(cfg, "checkout"), LoadPacer)
    assert pacer_for(cfg, "enroll") is None and pacer_for(cfg, "gate") is None
    off = FacePayConfig.model_validate({"checkout": {"load_pacing": {"enabled": False}}})
    assert pacer_for(off, "checkout") is None
    uncapped = FacePayConfig.model_validate({"checkout": {"camera_fps": None}})
    assert pacer_for(uncapped, "checkout") is None


def test_the_servers_share_is_that_of_about_the_last_window():
    clock = Clock()
    load = CheckoutLoad(window_s=1.0, clock=clock)
    assert load.share() is None  # no frames: nothing to tell
    load.add(15, 15)
    assert load.share() == pytest.approx(1.0)
    clock.now += 1.0
    load.add(30, 6)  # two cameras, a fifth of their frames analysed
    # The older second weighs 1/e: (15/e + 6) / (15/e + 30).
    assert load.share() == pytest.approx((15 / 2.718281828 + 6) / (15 / 2.718281828 + 30))
    clock.now += 5.0  # five windows later the frames weigh e^-5: too few to tell
    assert load.share() is None


def _lowered(load: CheckoutLoad | None) -> tuple[LoadPacer, Slot]:
    pacer = LoadPacer(LoadPacingConfig(), 15.0, load=load)
    slot = Slot(pacer)
    assert slot.feed([(15, 0), (15, 0)]) == [None, 5.0]  # a rush
    return pacer, slot


def test_a_new_checkout_starts_at_the_full_rate_once_the_rush_is_over():
    """A lowered camera would otherwise step back up a window, about a shopper, at a time."""
    clock = Clock()
    load = CheckoutLoad(window_s=1.0, clock=clock)
    pacer, slot = _lowered(load)
    clock.now += 8.0  # the camera paused for the prompt; the rush's frames have faded
    assert pacer.new_scan(slot.received, slot.taken) == 15.0
    assert pacer.fps == 15.0 and pacer.window_frames == 15
    # The windows start again from the slot's counts at the new scan.
    assert slot.feed([(14, 0)]) == [None]
    assert pacer.new_scan(slot.received, slot.taken) is None  # at the full rate already


def test_a_new_checkout_keeps_the_lowered_rate_while_the_server_is_still_short():
    clock = Clock()
    load = CheckoutLoad(window_s=1.0, clock=clock)
    pacer, slot = _lowered(load)
    clock.now += 0.5
    load.add(100, 50)  # the other cameras: half their frames analysed
    assert pacer.new_scan(slot.received, slot.taken) is None
    assert pacer.fps == 5.0
    load.add(400, 380)  # now nearly all (at least raise_above)
    assert pacer.new_scan(slot.received, slot.taken) == 15.0


def test_the_restart_can_be_turned_off_and_needs_no_shared_load():
    pacer = LoadPacer(LoadPacingConfig(restart_full=False), 15.0, load=CheckoutLoad(1.0))
    slot = Slot(pacer)
    assert slot.feed([(15, 0), (15, 0)]) == [None, 5.0]
    assert pacer.new_scan(slot.received, slot.taken) is None and pacer.fps == 5.0
    # Without a server-wide view there is no evidence of a rush: the full rate.
    alone, slot = _lowered(None)
    assert alone.new_scan(slot.received, slot.taken) == 15.0


def test_each_camera_tells_the_server_what_it_received_and_analysed():
    clock = Clock()
    load = CheckoutLoad(window_s=1.0, clock=clock)
    cfg = FacePayConfig()
    a = pacer_for(cfg, "checkout", received=100, taken=90, load=load)
    b = pacer_for(cfg, "checkout", load=load)
    assert a is not None and b is not None
    a.update(110, 92)  # since its start: 10 received, 2 analysed
    b.update(10, 2)
    assert load.share() == pytest.approx(0.2)


@pytest.mark.parametrize(
    "bad",
    [
        {"lower_below": 0.8, "raise_above": 0.5},
        {"lower_below": 0.0},
        {"min_fps": 1.0},
        {"window_s": 0.1},
        {"lower_after": 0},
        {"raise_step": 1.0},
        {"restart_full": "sometimes"},
    ],
)
def test_bounds(bad):
    with pytest.raises(ValidationError):
        LoadPacingConfig.model_validate(bad)
