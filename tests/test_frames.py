"""``FrameSlot``: the newest frame wins, and every frame is accounted for."""

from __future__ import annotations

from session.frames import FrameSlot


async def test_the_newest_frame_wins_and_replaced_frames_count_as_dropped() -> None:
    slot: FrameSlot[str] = FrameSlot()
    slot.put("a", 1.0)
    slot.put("b", 2.0)
    item = await slot.get(timeout=0.1)
    assert item is not None and item.frame == "b" and item.index == 2
    assert (slot.received, slot.dropped, slot.taken) == (2, 1, 1)
    assert await slot.get(timeout=0.01) is None  # nothing newer yet


async def test_drop_older_drops_only_a_frame_that_arrived_before_the_time() -> None:
    """What a gate does between looks at an empty corridor (``gate.idle_scan_fps``)."""
    slot: FrameSlot[str] = FrameSlot()
    slot.put("early", 1.00)
    slot.drop_older(1.10)
    assert await slot.get(timeout=0.01) is None
    slot.put("due", 1.10)
    slot.drop_older(1.10)  # arrived at the due time: kept
    item = await slot.get(timeout=0.1)
    assert item is not None and item.frame == "due"
    slot.drop_older(5.0)  # nothing waiting: nothing counted
    assert (slot.received, slot.dropped, slot.taken) == (2, 1, 1)


async def test_a_frame_says_since_when_frames_went_unlooked_at() -> None:
    """``since``: the arrival of the first frame after the last one taken, whether the
    frames between were replaced (a busy server) or dropped between idle looks; a gate's
    decision clock starts there."""
    slot: FrameSlot[str] = FrameSlot()
    slot.put("a", 1.0)
    item = await slot.get(timeout=0.1)
    assert item is not None and (item.t, item.since) == (1.0, 1.0)  # nothing skipped
    slot.put("b", 2.0)
    slot.put("c", 3.0)
    slot.drop_older(3.5)  # an idle gate's skip
    slot.put("d", 4.0)
    item = await slot.get(timeout=0.1)
    assert item is not None and item.frame == "d" and (item.t, item.since) == (4.0, 2.0)
    slot.put("e", 5.0)
    item = await slot.get(timeout=0.1)
    assert item is not None and item.since == 5.0  # counted from the last frame taken
    slot.put("f", 6.0)
    slot.clear()  # a new checkout: what came before is not this shopper's
    slot.put("g", 7.0)
    item = await slot.get(timeout=0.1)
    assert item is not None and item.since == 7.0
