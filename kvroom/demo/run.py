"""The demo: one prefill and N decode processes, hundreds of rooms, a summary.

Exit status 0 only when every room reached a terminal state, every Success
was verified byte for byte on decode, no process holds state for a terminal
room, and the audit log replays cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter

from kvroom.demo.cluster import Cluster, Node, NodeError
from kvroom.demo.nodes import NodeOptions, RoomResult
from kvroom.demo.workload import RoomSpec, make_rooms

__all__ = ["run"]


def _options(args: argparse.Namespace, audit_log: str) -> NodeOptions:
    chaos = args.chaos
    model = getattr(args, "model", None)  # a Namespace built by hand may predate --model
    return NodeOptions(
        layers=args.layers,
        page_bytes=args.page_kib << 10,
        model=model,
        pool_pages=max(512 if model is None else 128, args.concurrency * args.max_pages + 64),
        aux_slots=256 if model is None else args.concurrency * args.decodes + 8,
        chunk_pages=args.chunk_pages,
        concurrency=args.concurrency,
        audit_log=audit_log,
        host=args.host,
        port=args.port,
        deadlines=(4.0, 60.0, 2.0) if chaos else (30.0, 120.0, 30.0),
        heartbeat=(0.25, 3.0),
        stderr_path=audit_log + ".stderr",
    )


def _log_kill(audit_log: str, node: Node) -> None:
    with open(audit_log, "a") as f:
        f.write(json.dumps({"event": "process.killed", "process": f"{node.name}-{node.pid}"}) + "\n")


class Demo:
    """Runs one demo and keeps its bookkeeping."""

    def __init__(
        self, args: argparse.Namespace, audit_log: str, plan: list[tuple[float, str]] | None = None
    ) -> None:
        self.args = args
        self.audit_log = audit_log
        self.cluster = Cluster(_options(args, audit_log))
        self.rooms = make_rooms(args.requests, args.decodes, args.min_pages, args.max_pages, args.seed)
        self.pending: list[RoomSpec] = list(self.rooms)
        self.submitted: dict[int, str] = {}  # room -> decode node name it went to
        self.killed: set[str] = set()
        self.rng = random.Random(args.seed)
        self.chaos_log: list[str] = []
        # (fraction of rooms done, step): abort | kill | stop
        default = [(0.15, "abort"), (0.3, "kill"), (0.55, "stop"), (0.75, "abort")] if args.chaos else []
        self.plan = sorted(plan) if plan is not None else default
        self.started = 0.0

    # -- accounting -------------------------------------------------------------

    def done_rooms(self) -> set[int]:
        """Rooms whose every surviving side reported a terminal state."""
        prefill = self.cluster.outcome("prefill")
        decode = self.cluster.outcome("decode")
        done = set()
        for room, node in self.submitted.items():
            if room in prefill and (room in decode or node in self.killed):
                done.add(room)
        return done

    def submit_wave(self) -> None:
        outstanding = len(self.submitted) - len(self.done_rooms())
        budget = self.args.decodes * self.args.concurrency * 2 - outstanding
        if budget <= 0 or not self.pending:
            return
        wave, self.pending = self.pending[:budget], self.pending[budget:]
        self.cluster.submit(wave)
        for spec in wave:
            self.submitted[spec.room] = self.cluster.decodes[spec.decode].name

    # -- chaos ------------------------------------------------------------------

    def chaos(self, fraction: float) -> None:
        while self.plan and fraction >= self.plan[0][0]:
            _, step = self.plan.pop(0)
            getattr(self, f"_chaos_{step}")()

    def _inflight(self) -> list[int]:
        done = self.done_rooms()
        return [r for r in self.submitted if r not in done]

    def _chaos_abort(self) -> None:
        rooms = self._inflight()
        self.rng.shuffle(rooms)
        prefill = self.cluster.prefill
        assert prefill is not None
        for room in rooms[:5]:
            prefill.send("abort", room)
        by_name = {n.name: n for n in self.cluster.decodes.values()}
        for room in rooms[5:10]:
            node = by_name.get(self.submitted[room])
            if node is not None:
                node.send("abort", room)
        self.chaos_log.append(
            f"aborted {min(5, len(rooms))} rooms from prefill, {max(0, min(5, len(rooms) - 5))} from decode"
        )

    def _chaos_kill(self) -> None:
        index = self.rng.choice(sorted(self.cluster.decodes))
        node = self.cluster.decodes[index]
        self.cluster.kill(node)
        self.killed.add(node.name)
        _log_kill(self.audit_log, node)
        fresh = self.cluster.start_decode(index)
        self.chaos_log.append(f"killed {node.name} (pid {node.pid}) and restarted it as {fresh.name}")

    def _chaos_stop(self) -> None:
        node = self.cluster.decodes[self.rng.choice(sorted(self.cluster.decodes))]
        self.cluster.pause(node)
        pause = 2.0 + 1.0  # past the 2 s transfer deadline
        end = time.monotonic() + pause
        while time.monotonic() < end:
            self.cluster.pump(0.05)
        self.cluster.resume(node)
        self.chaos_log.append(f"stopped {node.name} for {pause:g} s (transfer deadline 2 s)")

    # -- run --------------------------------------------------------------------

    def run(self) -> int:
        args = self.args
        self.cluster.start_prefill()
        for i in range(args.decodes):
            self.cluster.start_decode(i)
        prefill = self.cluster.prefill
        assert prefill is not None
        print(f"prefill listening on {prefill.info['addr']}; {args.decodes} decode processes started")
        self.started = time.monotonic()
        last_print = 0.0
        total = len(self.rooms)
        deadline = self.started + args.timeout
        while True:
            self.submit_wave()
            self.cluster.pump(0.05)
            done = len(self.done_rooms())
            self.chaos(done / total)
            now = time.monotonic()
            if now - last_print >= 1.0 or done == total:
                last_print = now
                self._progress(done, total, now)
            if done == total and not self.pending:
                break
            if now > deadline:
                print(f"\nkvroom demo: gave up after {args.timeout:g} s with {total - done} rooms unfinished")
                break
        self.cluster.finish()
        return self.summary()

    def _progress(self, done: int, total: int, now: float) -> None:
        decode = self.cluster.outcome("decode").values()
        ok = sum(r.state == "Success" for r in decode)
        moved = sum(r.bytes for r in decode if r.state == "Success")
        rate = moved / max(now - self.started, 1e-9) / 2**20
        print(
            f"\r  rooms {done:5d}/{total}  decode ok {ok:5d}  {moved / 2**20:8.1f} MiB  {rate:7.1f} MiB/s",
            end="",
        )
        if done == total:
            print()

    def summary(self) -> int:
        elapsed = time.monotonic() - self.started
        prefill = self.cluster.outcome("prefill")
        decode = self.cluster.outcome("decode")
        problems: list[str] = []
        print("\nkvroom demo summary")
        print(f"  {'outcome':<12}{'prefill':>10}{'decode':>10}")
        for state in ("Success", "Failed"):
            p = sum(r.state == state for r in prefill.values())
            d = sum(r.state == state for r in decode.values())
            print(f"  {state:<12}{p:>10}{d:>10}")
        lost = [r for r, n in self.submitted.items() if n in self.killed and r not in decode]
        if lost:
            print(f"  {'lost with killed decode':<24}{len(lost):>8}")
        reasons = Counter(_reason(r) for r in [*prefill.values(), *decode.values()] if r.state == "Failed")
        if reasons:
            print("  failure reasons:")
            for reason, count in reasons.most_common(8):
                print(f"    {count:5d}  {reason}")
        for line in self.chaos_log:
            print(f"  chaos: {line}")
        good = [r for r in decode.values() if r.state == "Success"]
        moved = sum(r.bytes for r in good)
        rate = moved / elapsed / 2**20
        print(f"  bytes moved (verified): {moved / 2**20:.1f} MiB in {elapsed:.1f} s = {rate:.1f} MiB/s")
        latencies = sorted((r.finished - r.started) * 1000 for r in good)
        if latencies:
            p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
            p50 = statistics.median(latencies)
            print(f"  room latency (decode, created to Success): p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        unverified = [r.room for r in good if not r.verified]
        if unverified:
            problems.append(f"{len(unverified)} successful rooms had wrong bytes on decode: {unverified[:5]}")
        missing = [r for r in self.submitted if r not in prefill] + [
            r for r, n in self.submitted.items() if n not in self.killed and r not in decode
        ]
        if missing or self.pending:
            problems.append(f"{len(missing) + len(self.pending)} rooms never reached a terminal state")
        leaks = [r for r in [*prefill.values(), *decode.values()] if r.footprint]
        live_nodes = [n for n in self.cluster.nodes if n.final is not None]
        live_left = {n.name: sum(n.final["snapshot"]["rooms"].values()) for n in live_nodes if n.final}
        processes = len(self.cluster.nodes)
        if leaks or any(live_left.values()):
            problems.append(
                f"state left behind: {len(leaks)} terminal rooms with a footprint, live rooms {live_left}"
            )
        else:
            print(f"  leak check: every terminal room's footprint is empty on all {processes} processes: OK")
        for node in self.cluster.nodes:
            for err in node.errors:
                problems.append(f"{node.name} crashed: {err.strip().splitlines()[-1]}")
            if node.final and node.final["unexpected"]:
                problems.append(
                    f"{node.name}: exceptions escaped send()/poll(): {node.final['unexpected'][:2]}"
                )
        from kvroom.replay import replay

        with open(self.audit_log) as f:
            lines = f.readlines()
        report = replay(lines)
        print(
            f"  audit log: {self.audit_log} ({len(lines)} events); replay: "
            f"{report.rooms} rooms, {len(report.illegal)} illegal, "
            f"{len(report.non_terminal)} never terminal, "
            f"{len(report.leaked)} not cleaned up: {'OK' if report.ok else 'VIOLATIONS'}"
        )
        if not report.ok:
            problems.append(f"audit replay found violations; run: kvroom audit {self.audit_log}")
        if problems:
            print("kvroom demo: FAILED")
            for problem in problems:
                print(f"  - {problem}")
            return 1
        print("kvroom demo: OK")
        return 0


def _reason(result: RoomResult) -> str:
    text = result.error or "unknown"
    return f"{result.role}: {result.error_type}: {text.split(': ')[-1][:70]}"


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns its exit status."""
    if args.min_pages > args.max_pages:
        print("kvroom demo: --min-pages must not exceed --max-pages", file=sys.stderr)
        return 2
    audit_log = args.audit_log or os.path.join(tempfile.gettempdir(), f"kvroom-audit-{os.getpid()}.jsonl")
    try:
        open(audit_log, "w").close()
    except OSError as exc:
        print(
            f"kvroom demo: cannot write the audit log {audit_log}: {exc.strerror}; pass --audit-log PATH",
            file=sys.stderr,
        )
        return 2
    print(f"kvroom demo: {args.requests} requests, {args.decodes} decode processes, audit log {audit_log}")
    print(f"  (NIXL and process logs: {audit_log}.stderr)")
    demo = Demo(args, audit_log)
    try:
        return demo.run()
    except NodeError as exc:
        print(f"kvroom demo: {exc}", file=sys.stderr)
        return 2
    finally:
        demo.cluster.close()
