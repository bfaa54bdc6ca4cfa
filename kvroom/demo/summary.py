"""The demo's verdict and figures: what it prints after the run, and its ``--json`` object.

:func:`figures` computes kvroom's throughput (bytes of rooms that succeeded
on decode over the run's wall time), tokens/s, room latency p50/p99, and the
raw NIXL comparison (:mod:`kvroom.demo.compare`): the headline ratio is
kvroom against the raw loop *with equal work* (stamping and checking every
byte it moves, as kvroom's run does, or neither with ``--no-verify``),
compared with :data:`RATIO_TARGET`; the ratio against the raw loop *without
checks* is printed beside it (it measures the demo's own checking on top of
kvroom).  :func:`report` prints the outcome table, failure reasons, chaos
steps, figures, leak check and audit replay, and returns the exit status:
0 only when every room reached a terminal state, every Success was verified
byte for byte on decode (unless ``--no-verify``), no process holds state for
a terminal room, the audit log replays cleanly, and the raw loop found every
room it checked intact.  Figures never decide the status.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvroom.demo.cluster import Cluster
from kvroom.demo.ledger import Ledger
from kvroom.demo.node_options import RoomResult
from kvroom.demo.report import percentile
from kvroom.presets import Preset

__all__ = ["RATIO_TARGET", "RunFacts", "figures", "report", "as_json"]

RATIO_TARGET = 0.9
"""Target of kvroom's GB/s over the raw NIXL loop's with equal work, between the same processes."""


@dataclass
class RunFacts:
    """What one run did, as the summary needs it."""

    cluster: Cluster
    ledger: Ledger
    model: Preset | None
    concurrency: int
    decodes: int
    audit_log: str
    verify: bool  # False: --no-verify
    seconds: float  # wall time of the rooms
    chaos_log: list[str]
    raw: dict[str, Any] | None  # the raw loop without checks (None: not run)
    raw_equal: dict[str, Any] | None  # the raw loop with equal work (None: not run)


def _gbps(raw: dict[str, Any] | None) -> float | None:
    return raw["bytes"] / raw["seconds"] / 1e9 if raw is not None and raw.get("seconds", 0) > 0 else None


def figures(facts: RunFacts) -> dict[str, Any]:
    """Throughput, tokens/s, latency and both raw NIXL comparisons."""
    decode = facts.cluster.outcome("decode")
    elapsed = max(facts.seconds, 1e-9)
    good = [r for r in decode.values() if r.state == "Success"]
    moved = sum(r.bytes for r in good)
    latencies = [(r.finished - r.started) * 1000 for r in good]
    page_size = facts.model.model.page_size if facts.model is not None else 1
    pages = sum(r.pages for r in good)
    gbps = moved / elapsed / 1e9
    fig: dict[str, Any] = {
        "gbps": gbps,
        "tokens_per_s": pages * page_size / elapsed if facts.model is not None else None,
        "bytes": moved,
        "seconds": elapsed,
        "latency_ms_p50": percentile(latencies, 0.5),
        "latency_ms_p99": percentile(latencies, 0.99),
        "raw_nixl_gbps": None,
        "ratio_vs_raw_nixl": None,
        "raw_room_ms_p50": None,
        "latency_target_ms": None,
        "verify": facts.verify,
        "ratio_target": RATIO_TARGET,
        "raw_equal_work_gbps": None,
        "ratio_equal_work": None,
        "raw_equal_work_bytes": None,
        "raw_equal_work_rooms": None,
        "raw_equal_work_rooms_intact": None,
        "raw_equal_work_bytes_verified": None,
    }
    raw = facts.raw
    plain = _gbps(raw)
    if raw is not None and plain is not None:
        fig["raw_nixl_gbps"] = plain
        fig["ratio_vs_raw_nixl"] = gbps / plain
        fig["raw_room_ms_p50"] = percentile([t * 1000 for t in raw["room_seconds"]], 0.5)
        fig["latency_target_ms"] = 2 * fig["raw_room_ms_p50"] + 1.0
    equal = facts.raw_equal
    equal_gbps = _gbps(equal)
    if equal is not None and equal_gbps is not None:
        checked = equal.get("decode", {})
        fig["raw_equal_work_gbps"] = equal_gbps
        fig["ratio_equal_work"] = gbps / equal_gbps
        fig["raw_equal_work_bytes"] = equal["bytes"]
        fig["raw_equal_work_rooms"] = checked.get("rooms", 0)
        fig["raw_equal_work_rooms_intact"] = checked.get("intact", 0)
        fig["raw_equal_work_bytes_verified"] = checked.get("bytes_verified", 0)
    return fig


def _reason(result: RoomResult) -> str:
    text = result.error or "unknown"
    return f"{result.role}: {result.error_type}: {text.split(': ')[-1][:70]}"


def _raw_lines(facts: RunFacts, fig: dict[str, Any], say: Callable[[str], None]) -> list[str]:
    """Print both ratios, the one with equal work first; returns problems."""
    problems = []
    if fig["ratio_equal_work"] is not None:
        checked = (facts.raw_equal or {}).get("decode", {})
        rooms, intact = checked.get("rooms", 0), checked.get("intact", 0)
        if facts.verify:
            what = f"stamping and checking every byte it moves on decode as kvroom's run does ({rooms} rooms"
            what += ", all intact)" if intact == rooms else f", {rooms - intact} NOT intact)"
            if intact != rooms:
                problems.append(
                    f"the raw loop with equal work found {rooms - intact} of {rooms} rooms not intact"
                )
        else:
            what = "checking nothing, as kvroom's run with --no-verify"
        say(
            f"  kvroom / raw NIXL with equal work = {fig['ratio_equal_work']:.2f} "
            f"(target >= {RATIO_TARGET}): raw WRITE loop {fig['raw_equal_work_gbps']:.2f} GB/s, {what}"
        )
    if fig["ratio_vs_raw_nixl"] is not None:
        say(
            f"  kvroom / raw NIXL without checks = {fig['ratio_vs_raw_nixl']:.2f}: "
            f"raw WRITE loop {fig['raw_nixl_gbps']:.2f} GB/s, same bytes between the same processes, "
            "checking nothing"
        )
    return problems


def report(facts: RunFacts, fig: dict[str, Any], say: Callable[[str], None]) -> int:
    """Print the summary; returns the exit status."""
    cluster, ledger = facts.cluster, facts.ledger
    prefill = cluster.outcome("prefill")
    decode = cluster.outcome("decode")
    problems: list[str] = []
    say("\nkvroom demo summary")
    if facts.model is not None:
        m = facts.model
        kib = sum(b.rows * m.rank().row_bytes(b) for b in m.rank().buffers() if b.space == "kv") >> 10
        rows = (
            "aux and state rows"
            if any(b.space != "kv" for b in m.rank().buffers() if b.role != "aux")
            else "aux rows"
        )
        say(
            f"  model {m.name}: {m.description}; {m.model.layers} layers, "
            f"{m.model.page_size}-token pages of {kib} KiB over its KV buffers, with {rows}; "
            f"concurrency {facts.concurrency}"
        )
    say(f"  {'outcome':<12}{'prefill':>10}{'decode':>10}")
    for state in ("Success", "Failed"):
        p = sum(r.state == state for r in prefill.values())
        d = sum(r.state == state for r in decode.values())
        say(f"  {state:<12}{p:>10}{d:>10}")
    lost = [r for r, n in ledger.submitted.items() if n in ledger.killed and r not in decode]
    if lost:
        say(f"  {'lost with killed decode':<24}{len(lost):>8}")
    reasons = Counter(_reason(r) for r in [*prefill.values(), *decode.values()] if r.state == "Failed")
    if reasons:
        say("  failure reasons:")
        for reason, count in reasons.most_common(8):
            say(f"    {count:5d}  {reason}")
    for line in facts.chaos_log:
        say(f"  chaos: {line}")
    moved, elapsed = fig["bytes"], fig["seconds"]
    say(
        f"  bytes moved ({'verified' if facts.verify else 'not verified: --no-verify'}): "
        f"{moved / 2**20:.1f} MiB in {elapsed:.2f} s = "
        f"{moved / elapsed / 2**20:.1f} MiB/s = {fig['gbps']:.2f} GB/s"
        + (f", {fig['tokens_per_s']:,.0f} tokens/s" if fig["tokens_per_s"] is not None else "")
    )
    problems += _raw_lines(facts, fig, say)
    if decode and any(r.state == "Success" for r in decode.values()):
        say(
            f"  room latency (decode, page list sent to Success): p50 {fig['latency_ms_p50']:.2f} ms, "
            f"p99 {fig['latency_ms_p99']:.2f} ms"
        )
    if fig["raw_room_ms_p50"] is not None and facts.raw is not None:
        say(
            f"  raw NIXL time of one median room ({facts.raw['median_pages']} pages): "
            f"{fig['raw_room_ms_p50']:.2f} ms; latency target with --concurrency 1: "
            f"p50 <= 2 x that + 1 ms = {fig['latency_target_ms']:.2f} ms"
        )
    good = [r for r in decode.values() if r.state == "Success"]
    unverified = [r.room for r in good if not r.verified]
    if unverified and facts.verify:
        problems.append(f"{len(unverified)} successful rooms had wrong bytes on decode: {unverified[:5]}")
    missing = [r for r in ledger.submitted if r not in prefill] + [
        r for r, n in ledger.submitted.items() if n not in ledger.killed and r not in decode
    ]
    if missing or ledger.pending:
        problems.append(f"{len(missing) + len(ledger.pending)} rooms never reached a terminal state")
    problems += _leaks(cluster, [*prefill.values(), *decode.values()], say)
    problems += _audit(facts.audit_log, say)
    if problems:
        say("kvroom demo: FAILED")
        for problem in problems:
            say(f"  - {problem}")
        return 1
    say("kvroom demo: OK")
    return 0


def _leaks(cluster: Cluster, results: list[RoomResult], say: Callable[[str], None]) -> list[str]:
    """The leak check and the nodes' crashes; returns problems."""
    problems = []
    leaks = [r for r in results if r.footprint]
    live_left = {n.name: sum(n.final["snapshot"]["rooms"].values()) for n in cluster.nodes if n.final}
    if leaks or any(live_left.values()):
        problems.append(
            f"state left behind: {len(leaks)} terminal rooms with a footprint, live rooms {live_left}"
        )
    else:
        say(
            "  leak check: every terminal room's footprint is empty on all "
            f"{len(cluster.nodes)} processes: OK"
        )
    for node in cluster.nodes:
        for err in node.errors:
            problems.append(f"{node.name} crashed: {err.strip().splitlines()[-1]}")
        if node.final and node.final["unexpected"]:
            problems.append(f"{node.name}: exceptions escaped send()/poll(): {node.final['unexpected'][:2]}")
    return problems


def _audit(audit_log: str, say: Callable[[str], None]) -> list[str]:
    """Replay the audit log; returns problems."""
    from kvroom.observe.replay import replay

    with open(audit_log) as f:
        lines = f.readlines()
    report = replay(lines)
    say(
        f"  audit log: {audit_log} ({len(lines)} events); replay: "
        f"{report.rooms} rooms, {len(report.illegal)} illegal, "
        f"{len(report.non_terminal)} never terminal, "
        f"{len(report.leaked)} not cleaned up: {'OK' if report.ok else 'VIOLATIONS'}"
    )
    if not report.ok:
        return [f"audit replay found violations; run: kvroom audit {audit_log}"]
    return []


def as_json(facts: RunFacts, fig: dict[str, Any], status: int) -> dict[str, Any]:
    """The ``--json`` object: the figures, the room counts, and whether the run was OK."""
    prefill = facts.cluster.outcome("prefill")
    decode = facts.cluster.outcome("decode")
    submitted = facts.ledger.submitted
    both = [r for r in submitted if prefill.get(r) and decode.get(r)]
    success = sum(1 for r in both if prefill[r].state == decode[r].state == "Success")
    failed = sum(
        1
        for r in submitted
        if "Failed" in (getattr(prefill.get(r), "state", ""), getattr(decode.get(r), "state", ""))
    )
    return {
        **fig,
        "rooms": len(facts.ledger.rooms),
        "success": success,
        "failed": failed,
        "verified": sum(1 for r in decode.values() if r.state == "Success" and r.verified),
        "model": facts.model.name if facts.model is not None else None,
        "concurrency": facts.concurrency,
        "decodes": facts.decodes,
        "audit_log": facts.audit_log,
        "ok": status == 0,
    }
