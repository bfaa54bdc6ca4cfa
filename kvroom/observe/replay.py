"""``kvroom audit``: replay an audit log against the state machine declaration.

Each room of each process (``process`` field) is replayed from Bootstrapping
through its ``room.transition`` events using the same compiled rule table the
room table runs; its ``room.created`` event (when logged) starts the clock of
Bootstrapping.  A room id reused after cleanup starts a new lifecycle.
Violations: an illegal transition, a room that never reached a terminal state,
a terminal room never cleaned up.  Rooms of a process the log marks as killed
(``process.killed``) are counted as lost with it, not as violations.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from kvroom.fsm import TERMINAL, Event, KVPoll, Role
from kvroom.fsm.compile import COMPILED

__all__ = ["AuditReport", "replay", "main"]


@dataclass
class _Life:
    state: KVPoll = KVPoll.Bootstrapping
    entered: float | None = None
    cleaned: bool = False
    illegal: str | None = None
    reason: str | None = None


@dataclass
class AuditReport:
    """What a replay found."""

    rooms: int = 0
    success: int = 0
    failed: int = 0
    illegal: list[str] = field(default_factory=list)
    non_terminal: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    lost_with_process: list[str] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    durations: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    @property
    def ok(self) -> bool:
        """True when nothing is violated."""
        return not (self.illegal or self.non_terminal or self.leaked)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object."""
        return {
            "ok": self.ok,
            "rooms": self.rooms,
            "success": self.success,
            "failed": self.failed,
            "illegal": len(self.illegal),
            "non_terminal": len(self.non_terminal),
            "leaked": len(self.leaked),
            "lost_with_process": len(self.lost_with_process),
            "illegal_rooms": self.illegal,
            "non_terminal_rooms": self.non_terminal,
            "leaked_rooms": self.leaked,
            "failure_reasons": dict(self.reasons.most_common()),
            "state_seconds": {s: _percentiles(v) for s, v in sorted(self.durations.items())},
        }


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"p50": statistics.median(ordered), "p99": p99, "n": len(ordered)}


def _reason_class(reason: str | None) -> str:
    text = (reason or "unknown").split(": ")
    return text[-1][:80] if len(text) < 3 else ": ".join(text[-2:])[:80]


def replay(lines: list[str]) -> AuditReport:
    """Replay JSON lines; raises ValueError naming the first unreadable line."""
    lives: dict[tuple[str, str, int], list[_Life]] = defaultdict(list)
    durations: dict[str, list[float]] = defaultdict(list)
    killed: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            kind = entry["event"]
            if kind == "process.killed":
                killed.add(str(entry["process"]))
                continue
            if kind not in ("room.created", "room.transition", "room.cleanup"):
                continue
            key = (str(entry["process"]), str(entry["role"]), int(entry["room"]))
            role = Role(entry["role"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"line {number}: not a kvroom audit event ({exc})") from None
        history = lives[key]
        if kind == "room.cleanup":
            if history:
                history[-1].cleaned = True
            continue
        if kind == "room.created":
            try:
                created = float(entry["time"])
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"line {number}: malformed creation ({exc})") from None
            history.append(_Life(entered=created))
            continue
        try:
            src, dst = KVPoll[entry["src"]], KVPoll[entry["dst"]]
            event = Event(entry["trigger"])
            when = float(entry["time"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"line {number}: malformed transition ({exc})") from None
        if not history or (history[-1].cleaned and src is KVPoll.Bootstrapping):
            history.append(_Life())  # a log without creation events
        life = history[-1]
        if life.illegal:
            continue
        rules = COMPILED[role][0][event][life.state]
        legal = (
            life.state is src
            and rules is not None
            and any((src if r.dest is None else r.dest) is dst for r in rules)
        )
        if not legal:
            life.illegal = f"{src.name} -{event.value}-> {dst.name} while replay was in {life.state.name}"
            continue
        if life.entered is not None and dst is not src:
            durations[src.name].append(when - life.entered)
        if dst is not src:
            life.entered = when
        life.state = dst
        if dst is KVPoll.Failed:
            life.reason = entry.get("reason")
    report = AuditReport(durations=durations)
    for (process, role_name, room), history in sorted(lives.items()):
        for life in history:
            label = f"{process}/{role_name}/{room}"
            report.rooms += 1
            if life.illegal:
                report.illegal.append(f"{label}: {life.illegal}")
            elif life.state not in TERMINAL:
                (report.lost_with_process if process in killed else report.non_terminal).append(label)
            elif not life.cleaned:
                (report.lost_with_process if process in killed else report.leaked).append(label)
            elif life.state is KVPoll.Success:
                report.success += 1
            else:
                report.failed += 1
                report.reasons[_reason_class(life.reason)] += 1
    return report


def format_report(report: AuditReport) -> str:
    """The human summary."""
    out = [
        f"rooms {report.rooms}: {report.success} succeeded, {report.failed} failed, "
        f"{len(report.lost_with_process)} lost with a killed process",
        f"violations: {len(report.illegal)} illegal, {len(report.non_terminal)} never terminal, "
        f"{len(report.leaked)} not cleaned up",
    ]
    if report.reasons:
        out.append("failure reasons:")
        out.extend(f"  {count:6d}  {reason}" for reason, count in report.reasons.most_common(10))
    if report.durations:
        out.append("seconds per state:      p50        p99        n")
        for state, values in sorted(report.durations.items()):
            pct = _percentiles(values)
            out.append(f"  {state:<18}{pct['p50']:>9.4f}  {pct['p99']:>9.4f}  {int(pct['n']):>7d}")
    for title, items in (
        ("illegal", report.illegal),
        ("never terminal", report.non_terminal),
        ("not cleaned up", report.leaked),
    ):
        for item in items[:20]:
            out.append(f"{title}: {item}")
    out.append("audit: OK" if report.ok else "audit: VIOLATIONS FOUND")
    return "\n".join(out)


def main(path: str, *, as_json: bool = False) -> int:
    """Entry point of ``kvroom audit``; 0 when the log is clean."""
    try:
        with open(path) as f:
            lines = f.readlines()
        report = replay(lines)
    except OSError as exc:
        print(f"kvroom audit: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"kvroom audit: {path}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_json(), indent=2) if as_json else format_report(report))
    return 0 if report.ok else 1
