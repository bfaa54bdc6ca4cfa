"""``kvroom demo`` as a newcomer runs it: the real CLI in a subprocess."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvroom.replay import main as audit_main

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
    result = kvroom("demo", *args, "--audit-log", str(log))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Success\s+12\s+12\n", result.stdout), result.stdout
    assert "bytes moved (verified)" in result.stdout and "kvroom demo: OK" in result.stdout
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
