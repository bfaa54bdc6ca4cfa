"""Audit events, checked as dicts with structlog's capture_logs()."""

from __future__ import annotations

import json
from pathlib import Path

import structlog
from structlog.testing import capture_logs

from kvroom.errors import PeerLostError
from kvroom.fsm import Event, Role, RoomTable
from kvroom.observe.audit import AuditObserver, json_lines_logger


def test_one_event_per_transition_and_cleanup() -> None:
    with capture_logs() as logs:
        table = RoomTable(Role.SENDER, observer=AuditObserver(process="prefill-0"))
        room = table.create(7, 1.0, peer="decode-a")
        table.transfer_infos.put(room, "x")
        table.fire(room, Event.TRANSPORT_ERROR, 2.0, error=PeerLostError("gone"))
    assert logs == [
        {
            "event": "room.created",
            "log_level": "info",
            "process": "prefill-0",
            "room": 7,
            "role": "sender",
            "peer": "decode-a",
            "time": 1.0,
        },
        {
            "event": "room.transition",
            "log_level": "info",
            "process": "prefill-0",
            "room": 7,
            "role": "sender",
            "peer": "decode-a",
            "src": "Bootstrapping",
            "dst": "Failed",
            "trigger": "transport_error",
            "reason": "gone",
            "time": 2.0,
        },
        {
            "event": "room.cleanup",
            "log_level": "info",
            "process": "prefill-0",
            "room": 7,
            "role": "sender",
            "state": "Failed",
            "stores": ["request_status", "transfer_infos"],
            "time": 2.0,
        },
    ]


def test_library_does_not_configure_structlog() -> None:
    before = structlog.get_config()
    AuditObserver()
    json_lines_logger(open("/dev/null", "a"))  # noqa: SIM115
    assert structlog.get_config() == before


def test_json_lines_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    table = RoomTable(Role.RECEIVER, observer=AuditObserver(json_lines_logger(path), process="decode-0"))
    room = table.create(1, 0.5)
    table.fire(room, Event.ABORT, 0.75)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["room.created", "room.transition", "room.cleanup"]
    assert lines[0]["time"] == 0.5 and lines[0]["room"] == 1
    assert lines[1]["process"] == "decode-0" and lines[1]["dst"] == "Failed"


def test_background_observer_keeps_creation_first_and_tolerates_old_observers() -> None:
    from kvroom.fsm import RecordingObserver
    from kvroom.observe.audit import BackgroundObserver

    inner = RecordingObserver()
    background = BackgroundObserver(inner)
    table = RoomTable(Role.SENDER, observer=background)
    room = table.create(3, 1.0)
    table.fire(room, Event.ABORT, 2.0)
    background.close()
    assert [r.room for r in inner.created] == [3] and inner.created[0].time == 1.0
    assert [r.dst.name for r in inner.transitions] == ["Failed"]

    class Old:  # an observer written before creation was an event
        def __init__(self) -> None:
            self.seen: list[str] = []

        def on_transition(self, record: object) -> None:
            self.seen.append("transition")

        def on_cleanup(self, record: object) -> None:
            self.seen.append("cleanup")

        def on_ignored(self, record: object) -> None:
            self.seen.append("ignored")

    old = Old()
    table = RoomTable(Role.SENDER, observer=old)  # type: ignore[arg-type]
    table.fire(table.create(4, 1.0), Event.ABORT, 2.0)
    assert old.seen == ["transition", "cleanup"]
    background = BackgroundObserver(old)  # type: ignore[arg-type]
    table = RoomTable(Role.SENDER, observer=background)
    table.fire(table.create(5, 1.0), Event.ABORT, 2.0)
    background.close()
    assert old.seen == ["transition", "cleanup"] * 2
