"""``kvroom demo`` as a newcomer runs it: the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from kvroom.observe.replay import main as audit_main
from kvroom.presets import get_preset, preset_names

pytestmark = pytest.mark.slow


def kvroom(
    *args: str, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvroom.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def no_children_left(marker: str) -> bool:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return marker not in out


def test_demo_moves_and_verifies_every_room(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    result = kvroom("demo", "--requests", "120", "--max-pages", "16", "--audit-log", str(log))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"audit log {log}" in out
    assert re.search(r"Success\s+120\s+120\n", out), out
    assert "leak check: every terminal room's footprint is empty on all 3 processes: OK" in out
    assert "p50" in out and "MiB/s" in out and "kvroom demo: OK" in out
    assert audit_main(str(log)) == 0


@pytest.mark.parametrize("model", ["gpt-oss-20b", "deepseek-v3"])
def test_demo_moves_a_model_preset_with_its_state_rows(tmp_path: Path, model: str) -> None:
    log = tmp_path / "audit.jsonl"
    args = ("--model", model, "--requests", "12", "--concurrency", "4", "--max-pages", "6", "--decodes", "1")
    result = kvroom("demo", *args, "--no-raw", "--json", "--audit-log", str(log))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Success\s+12\s+12\n", result.stderr), result.stderr
    assert "bytes moved (verified)" in result.stderr and "kvroom demo: OK" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["model"] == model and summary["verified"] == 12  # pages, aux and state rows checked
    assert audit_main(str(log)) == 0


def test_chaos_demo_survives_kills_stops_and_aborts(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    result = kvroom("demo", "--chaos", "--requests", "200", "--max-pages", "16", "--audit-log", str(log))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"chaos: killed decode\d", out) and re.search(r"chaos: stopped decode\d", out), out[
        -2000:
    ]
    assert "chaos: aborted" in out
    assert "Failed" in out and "kvroom demo: OK" in out
    assert audit_main(str(log)) == 0


def test_bad_flags_give_one_line_and_exit_2() -> None:
    result = kvroom("demo", "--requests", "-3")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "must be a positive integer" in result.stderr and "--help" in result.stderr


def test_port_in_use_is_one_line_and_leaves_nothing_running(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = kvroom(
            "demo", "--port", str(port), "--requests", "5", "--audit-log", str(tmp_path / "a.jsonl")
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "choose another port" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert no_children_left(str(tmp_path))


def test_unavailable_nixl_backend_is_one_line(tmp_path: Path) -> None:
    result = kvroom("demo", "--requests", "5", env={"NIXL_PLUGIN_DIR": str(tmp_path / "none")})
    assert result.returncode == 2
    assert "NIXL" in result.stderr and result.stderr.strip().count("\n") == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def total(families: dict[str, Metric], sample: str, **labels: str) -> float:
    """Sum of ``sample`` over every node whose labels include ``labels``."""
    family = families[sample.removesuffix("_total").removesuffix("_count")]
    return sum(
        s.value
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_json_summary_and_scraped_metrics_agree_with_the_run(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    port = free_port()
    rooms = 40
    cmd = [sys.executable, "-m", "kvroom.cli", "demo", "--json", "--requests", str(rooms), "--max-pages", "8"]
    cmd += [
        "--model",
        "deepseek-v3",
        "--layers",
        "2",
        "--metrics-port",
        str(port),
        "--metrics-linger",
        "120",
        "--audit-log",
        str(log),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        summary = json.loads(proc.stdout.readline())  # printed before the metrics linger
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            text = response.read().decode()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    for key in ("gbps", "raw_nixl_gbps", "ratio_vs_raw_nixl", "latency_ms_p50", "latency_ms_p99"):
        assert isinstance(summary[key], float) and summary[key] > 0, (key, summary)
    assert summary["tokens_per_s"] > 0 and summary["model"] == "deepseek-v3" and summary["ok"] is True
    assert (summary["rooms"], summary["success"], summary["failed"], summary["verified"]) == (
        rooms,
        rooms,
        0,
        rooms,
    )
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for role in ("sender", "receiver"):
        assert total(families, "kvroom_rooms_created_total", role=role) == rooms
        assert total(families, "kvroom_room_latency_seconds_count", role=role, outcome="Success") == rooms
        ended = total(families, "kvroom_room_transitions_total", role=role, dst="Success", src="Transferring")
        assert ended == rooms
        assert total(families, "kvroom_room_failures_total", role=role) == 0
        assert total(families, "kvroom_rooms", role=role) == 0  # every room ended and was cleared
    rank = get_preset("deepseek-v3", 2).rank()
    aux = rooms * sum(b.rows * rank.row_bytes(b) for b in rank.buffers() if b.role == "aux")  # a row a room
    assert total(families, "kvroom_bytes_written_total") == summary["bytes"] + aux
    assert total(families, "kvroom_bytes_received_total") == summary["bytes"] + aux
    assert total(families, "kvroom_peers", role="sender") == 2  # both decodes, on the prefill
    assert audit_main(str(log)) == 0


def test_one_room_in_flight_reports_latency_against_raw(tmp_path: Path) -> None:
    result = kvroom(
        "demo", "--json", "--concurrency", "1", "--requests", "12", "--audit-log", str(tmp_path / "a.jsonl")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["concurrency"] == 1 and summary["success"] == 12
    assert summary["raw_room_ms_p50"] > 0 and summary["latency_target_ms"] == pytest.approx(
        2 * summary["raw_room_ms_p50"] + 1.0
    )
    assert "kvroom demo: OK" in result.stderr  # the human summary goes to stderr under --json


def test_help_lists_the_model_presets() -> None:
    result = kvroom("demo", "--help")
    assert result.returncode == 0
    assert len(preset_names()) >= 3 and all(name in result.stdout for name in preset_names())
    assert "default llama3-8b" in result.stdout


def test_equal_work_ratio_is_the_headline_and_its_raw_loop_checked_every_byte(tmp_path: Path) -> None:
    result = kvroom(
        "demo", "--json", "--requests", "40", "--max-pages", "8", "--audit-log", str(tmp_path / "a.jsonl")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    for key in ("raw_equal_work_gbps", "ratio_equal_work", "raw_nixl_gbps", "ratio_vs_raw_nixl"):
        assert isinstance(summary[key], float) and summary[key] > 0, (key, summary)
    assert summary["ratio_equal_work"] == pytest.approx(summary["gbps"] / summary["raw_equal_work_gbps"])
    assert summary["verify"] is True and summary["verified"] == 40 and summary["ratio_target"] == 0.9
    # decode checked every byte the raw loop moved, and found every room intact
    assert summary["raw_equal_work_rooms"] > 0
    assert summary["raw_equal_work_rooms_intact"] == summary["raw_equal_work_rooms"]
    assert summary["raw_equal_work_bytes_verified"] == summary["raw_equal_work_bytes"] > 0
    err = result.stderr
    equal, plain = (
        err.index("kvroom / raw NIXL with equal work = "),
        err.index("kvroom / raw NIXL without checks = "),
    )
    assert equal < plain and "(target >= 0.9)" in err[equal:plain] and "all intact" in err[equal:plain]


def test_no_verify_checks_nothing_on_either_side(tmp_path: Path) -> None:
    args = (
        "--json",
        "--no-verify",
        "--requests",
        "40",
        "--max-pages",
        "8",
        "--audit-log",
        str(tmp_path / "a.jsonl"),
    )
    result = kvroom("demo", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["verify"] is False and summary["success"] == 40
    assert summary["verified"] == 0  # kvroom's decodes checked nothing
    assert summary["raw_equal_work_rooms"] > 0 and summary["raw_equal_work_gbps"] > 0  # every room arrived
    assert summary["raw_equal_work_rooms_intact"] == summary["raw_equal_work_bytes_verified"] == 0
    assert "bytes moved (not verified: --no-verify)" in result.stderr
    assert "checking nothing, as kvroom's run with --no-verify" in result.stderr
