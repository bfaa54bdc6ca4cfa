"""``kvroom audit``: replaying logs against the declaration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvroom.cli import main
from kvroom.fsm import Event, Role, RoomTable
from kvroom.observe.audit import AuditObserver, json_lines_logger
from kvroom.observe.replay import format_report, replay


def write_log(path: Path) -> None:
    """A clean log: one success (cleared), one failure, from two 'processes'.

    Lines: the sender's creation, its four transitions and cleanup, then the receiver's.
    """
    sender = RoomTable(Role.SENDER, observer=AuditObserver(json_lines_logger(path), process="p-1"))
    receiver = RoomTable(Role.RECEIVER, observer=AuditObserver(json_lines_logger(path), process="d-2"))
    tx = sender.create(1, 0.0)
    sender.fire(tx, Event.DST_INFO, 0.1, infos=1)
    sender.fire(tx, Event.SEND, 0.2)
    sender.fire(tx, Event.COMPLETE, 0.3, aux=True)
    sender.fire(tx, Event.CLEAR, 0.4)
    rx = receiver.create(1, 0.0)
    receiver.fire(rx, Event.METADATA_SENT, 0.1)
    receiver.fire(rx, Event.PEER_LOST, 0.5, reason="prefill at x went silent")


def test_a_clean_log_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "a.jsonl"
    write_log(log)
    assert main(["audit", str(log)]) == 0
    out = capsys.readouterr().out
    assert "rooms 2: 1 succeeded, 1 failed" in out and "audit: OK" in out
    assert main(["audit", str(log), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {k: data[k] for k in ("rooms", "success", "failed", "illegal", "non_terminal", "leaked")} == {
        "rooms": 2,
        "success": 1,
        "failed": 1,
        "illegal": 0,
        "non_terminal": 0,
        "leaked": 0,
    }
    assert data["state_seconds"]["WaitingForInput"]["n"] == 2
    # creation is an event: time in Bootstrapping is measured from it
    assert data["state_seconds"]["Bootstrapping"] == {"p50": 0.1, "p99": 0.1, "n": 2}
    assert "Bootstrapping" in format_report(replay(log.read_text().splitlines()))


def edit(log: Path, keep: int | None = None, patch: dict[int, dict[str, object]] | None = None) -> list[str]:
    lines = log.read_text().splitlines()
    if patch:
        for index, fields in patch.items():
            entry = json.loads(lines[index])
            entry.update(fields)
            lines[index] = json.dumps(entry)
    return lines[:keep] if keep is not None else lines


def test_illegal_transition_is_found(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    write_log(log)
    report = replay(edit(log, patch={1: {"src": "Bootstrapping", "dst": "Success", "trigger": "complete"}}))
    assert len(report.illegal) == 1 and "p-1/sender/1" in report.illegal[0] and not report.ok


def test_non_terminal_and_leaked_rooms_are_found(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    write_log(log)
    lines = [line for line in edit(log) if '"room.cleanup"' not in line]
    report = replay(lines)
    assert report.leaked == ["d-2/receiver/1", "p-1/sender/1"]
    report = replay(edit(log, keep=2))
    assert report.non_terminal == ["p-1/sender/1"]


def test_rooms_of_a_killed_process_are_not_violations(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    write_log(log)
    lines = [*edit(log, keep=2), json.dumps({"event": "process.killed", "process": "p-1"})]
    report = replay(lines)
    assert report.ok and report.lost_with_process == ["p-1/sender/1"]


def test_unreadable_log_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "a.jsonl"
    write_log(log)
    log.write_text(log.read_text() + "{oops\n")
    assert main(["audit", str(log)]) == 2
    assert "line 11" in capsys.readouterr().err
    assert main(["audit", str(tmp_path / "missing.jsonl")]) == 2


def test_a_created_room_that_never_moved_is_non_terminal(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    write_log(log)
    lines = edit(log)
    created = [i for i, line in enumerate(lines) if '"room.created"' in line]
    assert len(created) == 2
    report = replay(lines[: created[1] + 1])  # the receiver's creation and nothing after it
    assert report.non_terminal == ["d-2/receiver/1"] and report.success == 1
