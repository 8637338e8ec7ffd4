"""facepay_thread_cpu_seconds_total on its own: roles by thread name, ended threads kept."""

from __future__ import annotations

import threading
import time

from stream_server.thread_cpu import ThreadCpuCollector, role_of, thread_cpu_s


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_roles_follow_thread_names_and_the_loop_thread() -> None:
    here = threading.current_thread()
    assert role_of(here, None) == "other_threads"
    assert role_of(here, threading.get_native_id()) == "event_loop"
    assert role_of(threading.Thread(name="facepay-work_0"), None) == "workers"
    assert role_of(threading.Thread(name="video-decoder"), None) == "video_decoders"


def test_a_thread_counts_under_its_role_and_keeps_its_cpu_after_it_ends() -> None:
    collector = ThreadCpuCollector()
    collector.set_loop_thread(threading.get_native_id())
    start = collector.totals()
    go, done = threading.Event(), threading.Event()

    def decoder() -> None:
        _spin(0.2)
        go.set()
        done.wait(10)

    thread = threading.Thread(target=decoder, name="video-decoder")
    thread.start()
    assert go.wait(10)
    seen = collector.totals()  # read while it runs
    assert seen["video_decoders"] - start["video_decoders"] >= 0.15
    assert thread.native_id is not None and (thread_cpu_s(thread.native_id) or 0) >= 0.15
    done.set()
    thread.join()
    _spin(0.2)  # this thread is the "loop" here
    after = collector.totals()  # the decoder is gone: its CPU stays counted
    assert after["video_decoders"] >= seen["video_decoders"]
    assert after["event_loop"] - start["event_loop"] >= 0.15
    assert thread_cpu_s(10**9) is None  # no such thread
