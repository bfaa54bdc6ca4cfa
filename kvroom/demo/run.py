"""The demo: one prefill and N decode processes, hundreds of model-shaped rooms, a summary.

The rooms' KV moves through kvroom at transport speed (pages are filled once
per room with a precomputed pattern and checked exactly on decode; the
scheduler loops are event-driven), then the same bytes are moved by a plain
NIXL WRITE loop between the same processes (:mod:`kvroom.demo.raw`), and the
summary prints both figures and their ratio, tokens/s, and room latency
(decode's page list sent to Success) p50/p99.

Exit status 0 only when every room reached a terminal state, every Success
was verified byte for byte on decode, no process holds state for a terminal
room, and the audit log replays cleanly.  Figures never decide the status.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from typing import Any, TextIO

from kvroom.demo.cluster import Cluster, Node, NodeError
from kvroom.demo.nodes import NodeOptions, RoomResult
from kvroom.demo.options import DEFAULT_MODEL
from kvroom.demo.report import NodeMetrics, Progress, percentile
from kvroom.demo.workload import RoomSpec, make_rooms
from kvroom.presets import Preset, get_preset
from kvroom.transport.auth import generate_keys

__all__ = ["run", "Demo"]

RATIO_TARGET = 0.8  # demo throughput / raw NIXL between the same processes


def _model(args: argparse.Namespace) -> Preset | None:
    """The model preset, or None for opaque pages (``--page-kib``, or a namespace without ``model``)."""
    if getattr(args, "page_kib", None) or not hasattr(args, "model"):
        return None
    return get_preset(args.model or DEFAULT_MODEL, getattr(args, "layers", None))


def _keys_dir(args: argparse.Namespace) -> str | None:
    """Where the nodes' CURVE pairs are (made if missing); None with ``--no-keys``."""
    if getattr(args, "no_keys", False):
        return None
    folder = getattr(args, "keys", None)
    if folder is None:
        folder = tempfile.mkdtemp(prefix="kvroom-keys-")
        atexit.register(shutil.rmtree, folder, True)
    for name in ("prefill", "decode"):
        if not os.path.exists(os.path.join(folder, f"{name}.key_secret")):
            generate_keys(folder, name)
    return str(folder)


def _options(args: argparse.Namespace, audit_log: str) -> NodeOptions:
    chaos = args.chaos
    model = _model(args)
    concurrency = args.concurrency
    return NodeOptions(
        layers=getattr(args, "layers", None) or 4,
        page_bytes=(getattr(args, "page_kib", None) or 16) << 10,
        model=model.name if model is not None else None,
        model_layers=model.model.layers if model is not None else None,
        pool_pages=max(512, concurrency * args.max_pages + 64),
        aux_slots=concurrency,  # a request row (aux, mamba state) for each room in flight
        chunk_pages=args.chunk_pages,
        concurrency=concurrency,
        audit_log=audit_log,
        host=args.host,
        port=args.port,
        deadlines=(4.0, 60.0, 2.0) if chaos else (30.0, 120.0, 30.0),
        heartbeat=(0.25, 3.0),
        stderr_path=audit_log + ".stderr",
        # chaos steps on a scheduler tick so faults land mid-transfer; otherwise event-driven
        chunk_interval=NodeOptions.chunk_interval if chaos else 0.0,
        metrics_interval=0.5 if getattr(args, "metrics_port", None) is not None else None,
        seed=args.seed,
        keys_dir=_keys_dir(args),
    )


def _log_kill(audit_log: str, node: Node) -> None:
    with open(audit_log, "a") as f:
        f.write(json.dumps({"event": "process.killed", "process": f"{node.name}-{node.pid}"}) + "\n")


class Demo:
    """Runs one demo and keeps its bookkeeping.

    Rooms go to prefill up to twice ``concurrency`` ahead (it fills their pages
    early, as a prefill forward pass would) and to their decode node up to
    ``concurrency`` in flight, so decode's room latency is not spent queueing.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        audit_log: str,
        plan: list[tuple[float, str]] | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.args = args
        self.audit_log = audit_log
        self.out = out or sys.stdout
        self.model = _model(args)
        self.opts = _options(args, audit_log)
        self.cluster = Cluster(self.opts)
        self.rooms = make_rooms(args.requests, args.decodes, args.min_pages, args.max_pages, args.seed)
        self.to_prefill: list[RoomSpec] = list(self.rooms)
        self.pending: list[RoomSpec] = list(self.rooms)  # not yet given to a decode
        self.submitted: dict[int, str] = {}  # room -> decode node name it went to
        self.killed: set[str] = set()
        self.rng = random.Random(args.seed)
        self.chaos_log: list[str] = []
        # (fraction of rooms done, step): abort | kill | stop
        default = [(0.15, "abort"), (0.3, "kill"), (0.55, "stop"), (0.75, "abort")] if args.chaos else []
        self.plan = sorted(plan) if plan is not None else default
        self.started = 0.0
        self.ended = 0.0
        self.raw: dict[str, Any] | None = None
        self.figures: dict[str, Any] = {}
        self._seen = 0  # results already counted
        self._prefill_done: set[int] = set()
        self._decode_done: set[int] = set()
        self._decode_open: set[int] = set()  # given to a live decode, not ended there
        self._done: set[int] = set()
        self._moved = 0
        self._ok = 0

    def say(self, *parts: object, **kw: Any) -> None:
        """Print to the demo's human output."""
        print(*parts, file=self.out, **kw)

    # -- accounting -------------------------------------------------------------

    def _count(self) -> None:
        """Take in new results (incrementally: the loop runs once per message)."""
        results = self.cluster.results
        for r in results[self._seen :]:
            if r.role == "prefill":
                self._prefill_done.add(r.room)
                if r.room in self._decode_done or self.submitted.get(r.room) in self.killed:
                    self._done.add(r.room)
            else:
                self._decode_done.add(r.room)
                self._decode_open.discard(r.room)
                if r.room in self._prefill_done:
                    self._done.add(r.room)
                if r.state == "Success":
                    self._ok += 1
                    self._moved += r.bytes
        self._seen = len(results)

    def _lost_node(self, name: str) -> None:
        """A decode node was killed: its rooms are done once prefill ended them."""
        self.killed.add(name)
        for room, node in self.submitted.items():
            if node == name:
                self._decode_open.discard(room)
                if room in self._prefill_done:
                    self._done.add(room)

    def done_rooms(self) -> set[int]:
        """Rooms whose every surviving side reported a terminal state."""
        self._count()
        return self._done

    def submit_wave(self) -> None:
        """Top up prefill (twice ``concurrency`` ahead) and the decodes (``concurrency`` in flight)."""
        self._count()
        limit = self.args.concurrency
        if self.to_prefill:
            room = 2 * limit - (len(self.rooms) - len(self.to_prefill) - len(self._prefill_done))
            if room > 0:
                wave, self.to_prefill = self.to_prefill[:room], self.to_prefill[room:]
                self.cluster.submit_prefill(wave)
        if self.pending:
            given = len(self.rooms) - len(self.to_prefill)  # rooms prefill has
            budget = min(limit - len(self._decode_open), given - len(self.submitted))
            if budget > 0:
                wave, self.pending = self.pending[:budget], self.pending[budget:]
                self.cluster.submit_decodes(wave)
                for spec in wave:
                    self.submitted[spec.room] = self.cluster.decodes[spec.decode].name
                    self._decode_open.add(spec.room)

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
        self._lost_node(node.name)
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
        """Start the processes, move every room, measure raw NIXL, print the summary."""
        args = self.args
        self.cluster.start_prefill()
        for i in range(args.decodes):
            self.cluster.start_decode(i)
        prefill = self.cluster.prefill
        assert prefill is not None
        keys = f"CURVE keys in {self.opts.keys_dir}" if self.opts.keys_dir else "no keys"
        self.say(
            f"prefill listening on {prefill.info['addr']} ({keys}); {args.decodes} decode processes started"
        )
        total = len(self.rooms)
        progress = Progress(total, self.out)
        self.started = time.monotonic()
        deadline = self.started + args.timeout
        shown = 0.0
        try:
            while True:
                self.submit_wave()
                self.cluster.pump(0.05)
                done = len(self.done_rooms())
                self.chaos(done / total)
                if time.monotonic() - shown >= 0.1 or done == total:  # the bar costs CPU
                    shown = time.monotonic()
                    progress.update(done, self._ok, self._moved)
                if done == total and not self.pending:
                    break
                if time.monotonic() > deadline:
                    self.say(
                        f"kvroom demo: gave up after {args.timeout:g} s with {total - done} rooms unfinished"
                    )
                    break
        finally:
            progress.close()
        self.ended = time.monotonic()
        if getattr(args, "raw", True) and not getattr(args, "chaos", False):
            self.raw = self.raw_phase()
        self.cluster.finish()
        return self.summary()

    def raw_phase(self) -> dict[str, Any] | None:
        """The same rooms' bytes by a plain NIXL WRITE loop between the same (now idle) processes."""
        prefill = self.cluster.prefill
        decodes = {i: n for i, n in self.cluster.decodes.items() if n.alive()}
        if prefill is None or not decodes or not prefill.alive():
            return None
        for node in decodes.values():
            node.raw = None
            node.send("raw_open")
        if not self.cluster.wait_until(lambda: all(n.raw is not None for n in decodes.values()), 60):
            return None
        peers = {i: n.raw for i, n in decodes.items()}
        rooms = [(s.decode, s.pages - s.prefix_pages) for s in self.rooms if s.decode in decodes]
        sizes = [n for _, n in rooms]
        median = int(percentile([float(n) for n in sizes], 0.5)) if sizes else 1
        prefill.raw = None
        plan = {
            "peers": peers,
            "rooms": rooms,
            "concurrency": self.args.concurrency,
            "median_pages": median,
            "chunk_pages": self.args.chunk_pages,
        }
        prefill.send("raw_run", {**plan, "seed": self.args.seed})
        ok = self.cluster.wait_until(lambda: prefill.raw is not None or not prefill.alive(), 300)
        result = prefill.raw if ok else None
        for node in decodes.values():
            node.raw = None
            node.send("raw_close")
        self.cluster.wait_until(lambda: all(n.raw is not None for n in decodes.values()), 30)
        if result is not None:
            result["median_pages"] = median
        return result

    def figures_of(self, decode: dict[int, RoomResult]) -> dict[str, Any]:
        """Throughput, tokens/s, latency and the raw NIXL comparison."""
        elapsed = max(self.ended - self.started, 1e-9)
        good = [r for r in decode.values() if r.state == "Success"]
        moved = sum(r.bytes for r in good)
        latencies = [(r.finished - r.started) * 1000 for r in good]
        page_size = self.model.model.page_size if self.model is not None else 1
        pages = sum(r.pages for r in good)
        fig: dict[str, Any] = {
            "gbps": moved / elapsed / 1e9,
            "tokens_per_s": pages * page_size / elapsed if self.model is not None else None,
            "bytes": moved,
            "seconds": elapsed,
            "latency_ms_p50": percentile(latencies, 0.5),
            "latency_ms_p99": percentile(latencies, 0.99),
            "raw_nixl_gbps": None,
            "ratio_vs_raw_nixl": None,
            "raw_room_ms_p50": None,
            "latency_target_ms": None,
        }
        raw = self.raw
        if raw is not None and raw["seconds"] > 0:
            fig["raw_nixl_gbps"] = raw["bytes"] / raw["seconds"] / 1e9
            fig["ratio_vs_raw_nixl"] = fig["gbps"] / fig["raw_nixl_gbps"]
            fig["raw_room_ms_p50"] = percentile([t * 1000 for t in raw["room_seconds"]], 0.5)
            fig["latency_target_ms"] = 2 * fig["raw_room_ms_p50"] + 1.0
        return fig

    def summary(self) -> int:
        """Print the summary (and the JSON object when asked); returns the exit status."""
        say = self.say
        prefill = self.cluster.outcome("prefill")
        decode = self.cluster.outcome("decode")
        fig = self.figures = self.figures_of(decode)
        problems: list[str] = []
        say("\nkvroom demo summary")
        if self.model is not None:
            m = self.model
            kib = sum(b.rows * m.rank().row_bytes(b) for b in m.rank().buffers() if b.space == "kv") >> 10
            rows = (
                "aux and state rows"
                if any(b.space != "kv" for b in m.rank().buffers() if b.role != "aux")
                else "aux rows"
            )
            say(
                f"  model {m.name}: {m.description}; {m.model.layers} layers, "
                f"{m.model.page_size}-token pages of {kib} KiB over its KV buffers, with {rows}; "
                f"concurrency {self.args.concurrency}"
            )
        say(f"  {'outcome':<12}{'prefill':>10}{'decode':>10}")
        for state in ("Success", "Failed"):
            p = sum(r.state == state for r in prefill.values())
            d = sum(r.state == state for r in decode.values())
            say(f"  {state:<12}{p:>10}{d:>10}")
        lost = [r for r, n in self.submitted.items() if n in self.killed and r not in decode]
        if lost:
            say(f"  {'lost with killed decode':<24}{len(lost):>8}")
        reasons = Counter(_reason(r) for r in [*prefill.values(), *decode.values()] if r.state == "Failed")
        if reasons:
            say("  failure reasons:")
            for reason, count in reasons.most_common(8):
                say(f"    {count:5d}  {reason}")
        for line in self.chaos_log:
            say(f"  chaos: {line}")
        moved, elapsed = fig["bytes"], fig["seconds"]
        say(
            f"  bytes moved (verified): {moved / 2**20:.1f} MiB in {elapsed:.2f} s = "
            f"{moved / elapsed / 2**20:.1f} MiB/s = {fig['gbps']:.2f} GB/s"
            + (f", {fig['tokens_per_s']:,.0f} tokens/s" if fig["tokens_per_s"] is not None else "")
        )
        if fig["raw_nixl_gbps"] is not None:
            say(
                "  raw NIXL WRITE loop, same bytes between the same processes: "
                f"{fig['raw_nixl_gbps']:.2f} GB/s; "
                f"kvroom / raw = {fig['ratio_vs_raw_nixl']:.2f} (target >= {RATIO_TARGET})"
            )
        if decode and any(r.state == "Success" for r in decode.values()):
            say(
                f"  room latency (decode, page list sent to Success): p50 {fig['latency_ms_p50']:.2f} ms, "
                f"p99 {fig['latency_ms_p99']:.2f} ms"
            )
        if fig["raw_room_ms_p50"] is not None and self.raw is not None:
            say(
                f"  raw NIXL time of one median room ({self.raw['median_pages']} pages): "
                f"{fig['raw_room_ms_p50']:.2f} ms; latency target with --concurrency 1: "
                f"p50 <= 2 x that + 1 ms = {fig['latency_target_ms']:.2f} ms"
            )
        good = [r for r in decode.values() if r.state == "Success"]
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
            say(f"  leak check: every terminal room's footprint is empty on all {processes} processes: OK")
        for node in self.cluster.nodes:
            for err in node.errors:
                problems.append(f"{node.name} crashed: {err.strip().splitlines()[-1]}")
            if node.final and node.final["unexpected"]:
                problems.append(
                    f"{node.name}: exceptions escaped send()/poll(): {node.final['unexpected'][:2]}"
                )
        from kvroom.observe.replay import replay

        with open(self.audit_log) as f:
            lines = f.readlines()
        report = replay(lines)
        say(
            f"  audit log: {self.audit_log} ({len(lines)} events); replay: "
            f"{report.rooms} rooms, {len(report.illegal)} illegal, "
            f"{len(report.non_terminal)} never terminal, "
            f"{len(report.leaked)} not cleaned up: {'OK' if report.ok else 'VIOLATIONS'}"
        )
        if not report.ok:
            problems.append(f"audit replay found violations; run: kvroom audit {self.audit_log}")
        if problems:
            say("kvroom demo: FAILED")
            for problem in problems:
                say(f"  - {problem}")
            return 1
        say("kvroom demo: OK")
        return 0


def _reason(result: RoomResult) -> str:
    text = result.error or "unknown"
    return f"{result.role}: {result.error_type}: {text.split(': ')[-1][:70]}"


def _json(demo: Demo, status: int) -> dict[str, Any]:
    prefill = demo.cluster.outcome("prefill")
    decode = demo.cluster.outcome("decode")
    both = [r for r in demo.submitted if prefill.get(r) and decode.get(r)]
    success = sum(1 for r in both if prefill[r].state == decode[r].state == "Success")
    failed = sum(
        1
        for r in demo.submitted
        if "Failed" in (getattr(prefill.get(r), "state", ""), getattr(decode.get(r), "state", ""))
    )
    return {
        **demo.figures,
        "rooms": len(demo.rooms),
        "success": success,
        "failed": failed,
        "verified": sum(1 for r in decode.values() if r.state == "Success" and r.verified),
        "model": demo.model.name if demo.model is not None else None,
        "concurrency": demo.args.concurrency,
        "decodes": demo.args.decodes,
        "audit_log": demo.audit_log,
        "ok": status == 0,
    }


def _serve_metrics(demo: Demo, port: int) -> Any:
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(NodeMetrics(lambda: demo.cluster.nodes))
    server, _thread = start_http_server(port, demo.args.host, registry=registry)
    return server


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns its exit status."""
    if args.min_pages > args.max_pages:
        print("kvroom demo: --min-pages must not exceed --max-pages", file=sys.stderr)
        return 2
    as_json = getattr(args, "json", False)
    out = sys.stderr if as_json else sys.stdout  # --json: stdout carries only the object
    audit_log = args.audit_log or os.path.join(tempfile.gettempdir(), f"kvroom-audit-{os.getpid()}.jsonl")
    try:
        open(audit_log, "w").close()
    except OSError as exc:
        print(
            f"kvroom demo: cannot write the audit log {audit_log}: {exc.strerror}; pass --audit-log PATH",
            file=sys.stderr,
        )
        return 2
    demo = Demo(args, audit_log, out=out)
    server = None
    port = getattr(args, "metrics_port", None)
    if port is not None:
        try:
            server = _serve_metrics(demo, port)
        except OSError as exc:
            print(f"kvroom demo: cannot serve metrics on {args.host}:{port}: {exc.strerror}", file=sys.stderr)
            return 2
    what = f"model {demo.model.name}" if demo.model is not None else f"{demo.opts.page_bytes >> 10} KiB pages"
    print(
        f"kvroom demo: {args.requests} requests, {what}, {args.decodes} decode processes, "
        f"audit log {audit_log}",
        file=out,
    )
    print(f"  (NIXL and process logs: {audit_log}.stderr)", file=out)
    if server is not None:
        print(f"  metrics: http://{args.host}:{server.server_port}/metrics", file=out)
    try:
        status = demo.run()
    except NodeError as exc:
        print(f"kvroom demo: {exc}", file=sys.stderr)
        return 2
    finally:
        demo.cluster.close()
    if as_json:
        print(json.dumps(_json(demo, status)), flush=True)
    if server is not None:
        linger = getattr(args, "metrics_linger", 5.0)
        print(f"  serving final metrics for {linger:g} s more", file=out, flush=True)
        time.sleep(linger)
        server.shutdown()
        server.server_close()
    return status
