"""``facepay bench`` end to end in a short smoke form: real server process, real terminals.

The benchmark's figures are reported by the command, never asserted here (no timed
assertions); this checks that it measures what it says: every session accounted for, the
server's own counters read, CPU and model time from the same run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import redis

from pipeline.scene_presets import preset_scene
from tests.e2e import operators_redis, run_facepay

DATA_ENV = "FACEPAY_TEST_DATA"


def _facepay(*argv: str, redis_env: str | None = None) -> dict:
    """Run ``facepay ARGV`` as a new process (clean server environment, but for
    FACEPAY_REDIS_URL=``redis_env`` if given); its last JSON line."""
    extra = {"FACEPAY_REDIS_URL": redis_env} if redis_env is not None else None
    proc = run_facepay(*argv, extra_env=extra, drop=(DATA_ENV,))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _untouched(client: redis.Redis) -> None:
    assert client.keys("*") == [b"fp:merchant:real"]  # nothing flushed, nothing written
    assert client.get("fp:merchant:real") == b"production data"


def test_bench_runs_real_terminals_and_reports_the_contract_keys(
    models_dir, data_dir, tmp_path, redis_url
):
    """With the operator's FACEPAY_REDIS_URL exported, as the README has it: the bench
    runs in its own Redis and leaves that one alone."""
    operators = operators_redis(redis_url)
    plot = tmp_path / "bench.png"
    out = _facepay(
        "bench",
        "--models-dir",
        str(models_dir),
        "--enroll-photo",
        str(data_dir / "faces/obama/obama.jpg"),
        "--sweep",
        "1,2",
        "--terminals",
        "2",
        "--duration",
        "4",
        "--ws-terminals",
        "3",
        "--sample-every",
        "1",
        "--plot",
        str(plot),
        str(data_dir / "faces/obama/obama3.jpg"),
        redis_env=redis_url,
    )
    _untouched(operators)
    # DESIGN.md §5 keys.
    for key in ("terminals", "confirm_ms", "sessions", "frames", "cpu_ms_per_decision"):
        assert key in out
    for key in ("model_ms_per_decision", "overhead_ratio", "peak_rss_mb"):
        assert key in out
    assert out["terminals"] == 2
    assert out["video_between_shoppers"] == "paused"  # as the web client's checkout page
    sessions = out["sessions"]
    assert sessions["lost"] == 0 and sessions["decided"] == sessions["started"] >= 2
    assert out["outcomes"] == {"approved": sessions["started"]}  # the enrolled shopper pays
    assert set(out["confirm_ms"]) == {"p50", "p95", "max"}
    assert out["confirm_ms"]["p50"] <= out["confirm_ms"]["p95"] <= out["confirm_ms"]["max"]
    frames = out["frames"]
    assert 0 < frames["processed"] <= frames["received"] <= frames["sent"]
    assert frames["no_detector"] == 0  # a checkout runs the detector on every analysed frame
    # Server CPU includes the model inference it did, so the ratio is at least 1.
    assert 0 < out["model_ms_per_decision"] <= out["cpu_ms_per_decision"]
    assert out["overhead_ratio"] >= 1.0
    assert 1.0 <= out["overhead_ratio_without_argon2id"] < out["overhead_ratio"]
    # The embedded Redis is a child of the server the bench started: reported beside it.
    assert out["redis_cpu_ms_per_decision"] is not None
    assert 0 <= out["redis_cpu_ms_per_decision"] < out["cpu_ms_per_decision"]
    # The rest by thread, from the server's facepay_thread_cpu_seconds_total: every role
    # did work (terminals streamed, frames were decoded and analysed), and the parts add
    # up to the whole within rounding.
    split = out["cpu_breakdown_ms_per_decision"]
    by_thread = split["other_by_thread"]
    assert by_thread["video_decoders"] > 0 and by_thread["event_loop"] > 0
    assert by_thread["workers_own"] > 0
    assert abs(sum(by_thread.values()) - split["other"]) <= 0.5
    without = out["overhead_ratio_without_argon2id_and_decoding"]
    assert 1.0 <= without < out["overhead_ratio_without_argon2id"]
    decoders_ms = (out["overhead_ratio_without_argon2id"] - without) * split["model"]
    assert abs(decoders_ms - by_thread["video_decoders"]) <= 0.02 * split["model"] + 0.5
    assert out["peak_rss_mb"] > 0
    assert [row["terminals"] for row in out["sweep"]] == [1, 2]
    # The WebSocket-only terminals' checkouts were all cancelled cleanly.
    ws = out["ws_sessions"]
    assert ws["started"] >= 3 and ws["errors"] == 0 and out["error_rate"] == 0
    resources = out["resources"]
    assert resources["rss_mb"]["max"] >= resources["rss_mb"]["start"] > 0
    assert resources["fds"]["start"] > 0
    # Payments add ledger keys; cancelled checkouts add none worth a leak check here.
    assert resources["redis_keys"]["end"] >= resources["redis_keys"]["start"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_checkout_bench_camera_obeys_the_servers_cap(models_dir, data_dir):
    """At ``--fps 30`` the server caps each checkout camera at ``checkout.camera_fps`` (15)
    after each answer, and the bench's camera obeys as a browser's does: it leaves out every
    second frame (one temporal layer), and the shopper still pays."""
    out = _facepay(
        "bench",
        "--models-dir",
        str(models_dir),
        "--terminals",
        "1",
        "--fps",
        "30",
        "--duration",
        "5",
        str(data_dir / "faces/obama/obama3.jpg"),
    )
    sessions = out["sessions"]
    assert sessions["lost"] == 0 and sessions["decided"] == sessions["started"] >= 1
    assert out["outcomes"] == {"approved": sessions["started"]}
    camera = out["camera"]
    assert camera["camera_changes"] >= 1  # one cap per answer
    sent, held = out["frames"]["sent"], camera["frames_held"]
    # Capped from the answer on: half of the camera's frames, less the few before it.
    assert 0.4 <= held / (sent + held) <= 0.5, (sent, held)
    assert out["frames"]["received"] <= sent


def test_bench_gate_mode_runs_concurrent_gates_and_judges_every_decision(
    models_dir, data_dir, tmp_path
):
    """``facepay bench --mode gate``: two real gates at once, each streaming the 3-person
    scene in a loop (two enrolled walkers and an unknown one per pass), judged from the
    ledger; the server figures come from the same run."""
    raw = tmp_path / "gate.jsonl"
    # A user's config with a production entry window: the bench must set the scene's on
    # top, or every pass after a walker's first would be a repeat (and counted missed).
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"policy": {"gate_entry_window_s": 600}}))
    out = _facepay(
        "bench",
        "--mode",
        "gate",
        "--terminals",
        "2",
        "--duration",
        "14",
        "--models-dir",
        str(models_dir),
        "--data-dir",
        str(data_dir),
        "--config",
        str(config),
        "--raw",
        str(raw),
    )
    assert out["mode"] == "gate" and out["terminals"] == 2 and out["people"] == 3
    # One pass is the scene and an empty corridor as long as the entry window, so that a
    # walker's next pass is charged again and a re-formed track inside a pass is not.
    assert out["pass_s"] >= out["entry_window_s"] > 0
    for key in ("decision_ms", "frames", "cpu_ms_per_decision", "model_ms_per_decision"):
        assert key in out
    assert out["wrong_opens"] == 0 and out["missed"] == 0 and out["terminal_errors"] == []
    # 14 s with the second gate starting half a pass late: 2 + 1 complete passes, two
    # enrolled walkers each.
    assert out["expected_opens"] == 6
    decisions = out["decisions"]
    assert decisions["opens"] >= out["expected_opens"]
    assert decisions["denies"].get("unknown", 0) >= 3  # the unknown walker, every pass
    assert (
        decisions["server"]
        == decisions["opens"] + sum(decisions["denies"].values()) + (decisions["repeats"])
    )
    assert out["decision_ms"]["p50"] <= out["decision_ms"]["p95"] <= out["decision_ms"]["max"]
    frames = out["frames"]
    assert 0 < frames["processed"] <= frames["received"] <= frames["sent"]
    # Each pass ends in an empty corridor: its unchanged looks skipped the detector.
    assert 0 < frames["no_detector"] < frames["processed"]
    assert 0 < out["model_ms_per_decision"] <= out["cpu_ms_per_decision"]
    # No passphrase at a gate: no argon2id, so both ratios are the same.
    assert out["overhead_ratio"] == out["overhead_ratio_without_argon2id"] >= 1.0
    assert out["cpu_breakdown_ms_per_decision"]["argon2id"] == 0
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    assert len(records) == decisions["opens"] + sum(decisions["denies"].values())
    assert {r["terminal"] for r in records} == {0, 1}
    assert all(r["pass"] is not None and r["decision_ms"] > 0 for r in records)
    assert all(r["payment_id"] for r in records if r["gate"] == "open")
    # From the camera's frame in which a walker's face reached the gate's minimum size to
    # the open at the terminal: after that frame, and while the walker is still in view.
    after = out["camera_to_open_ms"]
    walk_ms = 1000 * max(a.exit_s - a.enter_s for a in preset_scene(3).actors)
    assert 0 < after["p50"] <= after["p95"] <= after["max"] < walk_ms
    assert all(r["since_reach_ms"] for r in records if r["gate"] == "open")


def test_bench_gate_renders_a_scene_and_reports_the_contract_keys(models_dir, data_dir, redis_url):
    """``facepay bench-gate --people 1``: the server in the command's own process (on the
    loop ``serve`` would use), a real gate terminal streaming the rendered scene; in its own
    Redis, never the operator's FACEPAY_REDIS_URL (which it once emptied)."""
    operators = operators_redis(redis_url)
    out = _facepay(
        "bench-gate",
        "--people",
        "1",
        "--models-dir",
        str(models_dir),
        "--data-dir",
        str(data_dir),
        redis_env=redis_url,
    )
    _untouched(operators)
    # DESIGN.md §5 keys.
    for key in ("people", "decision_ms", "wrong_opens", "missed", "cpu_ms_per_decision"):
        assert key in out
    assert out["people"] == 1
    assert out["wrong_opens"] == 0 and out["missed"] == []
    assert set(out["decision_ms"]) >= {"p50", "p95", "max"}
    assert out["cpu_ms_per_decision"] > 0
    # The replay's clock is the scene's: the open comes after the walker's face reached the
    # gate's minimum size and before the walker leaves.
    walker = preset_scene(1).actors[0]
    after = out["camera_to_open_ms"]
    assert 0 < after["p50"] == after["max"] < 1000 * (walker.exit_s - walker.enter_s)
    # The rendered scene stays for reuse; the private Redis's data (the run's enrolments)
    # does not outlive the command.
    work = Path(out["scene"]).parent
    assert Path(out["scene"]).is_file() and not (work / "data").exists()
    shutil.rmtree(work)


async def test_gate_judging_times_each_walkers_first_open_from_its_own_frame() -> None:
    """``camera_to_open_ms`` takes, for each walker's first open in a pass, the time since
    that walker's frame (``reach_frames``, by account); a second open, a stranger's open
    and denies are not timed."""
    from stream_server.bench_gate import judge

    ledger = {"p1": "obama", "p2": "kit", "p3": "obama", "p4": "victim", "p5": "kit"}

    async def get(http: object, path: str) -> dict[str, str]:
        return {"account_id": ledger[path.rsplit("/", 1)[1]]}

    def rec(terminal: int, n: int, gate: str, pid: str | None, since: dict[str, float]):
        return {"terminal": terminal, "pass": n, "gate": gate, "payment_id": pid,
                "decision_ms": 200.0, "since_reach_ms": since}  # fmt: skip

    records = [
        rec(0, 0, "open", "p1", {"43": 150.0}),
        rec(0, 0, "open", "p2", {"43": 600.0, "52": 300.0}),
        rec(0, 0, "open", "p3", {"43": 900.0, "52": 600.0}),  # obama again: wrong, untimed
        rec(0, 0, "deny", None, {"43": 950.0, "52": 650.0}),
        rec(0, 0, "open", "p4", {"43": 990.0, "52": 690.0}),  # a print's victim: untimed
        rec(1, 0, "open", "p5", {"43": 640.0, "52": 340.0}),
    ]
    accounts = {"obama": "live", "kit": "live", "victim": "print"}
    reach = {"obama": 43, "kit": 52}
    verdict = await judge(None, get, records, {0: 1, 1: 1}, accounts, reach)
    assert verdict["wrong_opens"] == 2 and verdict["missed"] == 1  # obama at gate 1
    assert verdict["camera_to_open_ms"] == {"p50": 300.0, "p95": 340.0, "max": 340.0}


def test_gate_judging_counts_a_strangers_open_and_a_second_open_in_one_pass() -> None:
    from stream_server.bench_gate import wrong_opens

    live = {"obama", "kit"}
    opens = [((0, 0), "obama"), ((0, 0), "kit"), ((0, 1), "obama"), ((1, 0), "obama")]
    assert wrong_opens(opens, live) == (
        0,
        {(0, 0): ["obama", "kit"], (0, 1): ["obama"], (1, 0): ["obama"]},
    )
    wrong, opened = wrong_opens([*opens, ((0, 1), "obama"), ((1, 0), "attacker")], live)
    assert wrong == 2  # obama twice in gate 0's second pass; the print attacker's victim
    assert opened[(1, 0)] == ["obama", "attacker"]


def test_the_benchs_settings_go_on_top_of_the_users_config(tmp_path) -> None:
    """``--config FILE``: the file's settings stay, the bench's own (lifted limits, the
    gate scene's entry window) replace theirs key by key; an unreadable file is refused
    before any server starts."""
    from pipeline.errors import ConfigError
    from session.config import read_config_data, with_sections

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"policy": {"gate_entry_window_s": 600, "gate_fare": 2}}))
    bench = {"policy": {"gate_entry_window_s": 7.5}, "limits": {"x": 1}}
    merged = with_sections(read_config_data(path), bench)
    assert merged == {"policy": {"gate_entry_window_s": 7.5, "gate_fare": 2}, "limits": {"x": 1}}
    assert read_config_data(None) == {}
    for text in ("{not json", "[1, 2]"):
        path.write_text(text)
        with pytest.raises(ConfigError, match="cannot read config"):
            read_config_data(path)
    proc = run_facepay("bench", "--config", str(path), drop=(DATA_ENV,))
    assert proc.returncode != 0 and "cannot read config" in proc.stderr, proc.stderr


def test_a_gate_scene_knows_when_each_walker_can_be_timed(models_dir, data_dir, tmp_path):
    """The looped scene's reach times, from its ground truth while it renders: the frame in
    which the walker's face is ``min_face_px`` wide and tall; a size it never reaches
    leaves the walker untimed, not the bench broken."""
    from stream_server.bench_gate import gate_scene

    walker = preset_scene(1).actors[0]
    scene = gate_scene(None, 1, str(models_dir), data_dir, tmp_path, 80.0)
    (name, reach), *rest = scene.reach_s
    assert name == walker.name and not rest
    assert walker.enter_s < reach < walker.exit_s and walker.face_at(reach) >= 80.0
    assert scene.reach_frames(30.0) == {name: round(reach * 30.0)}
    assert gate_scene(None, 1, str(models_dir), data_dir, tmp_path, 400.0).reach_s == ()
