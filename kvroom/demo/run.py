"""The demo: one prefill and N decode processes, hundreds of model-shaped rooms, a summary.

The rooms' KV moves through kvroom at transport speed (pages are filled once
per room with a precomputed pattern and checked exactly on decode; the
scheduler loops are event-driven), then the same bytes are moved by plain
NIXL WRITE loops between the same processes (:mod:`kvroom.demo.compare`):
one doing the same per-room checks as kvroom's run (the headline ratio) and
one checking nothing.  The summary (:mod:`kvroom.demo.summary`) prints the
figures and both ratios, tokens/s, and room latency (decode's page list sent
to Success) p50/p99.

This module holds :class:`Demo`, which runs one demo: it starts the
processes (:mod:`kvroom.demo.cluster`), hands out rooms
(:mod:`kvroom.demo.ledger`), injects faults under ``--chaos``
(:mod:`kvroom.demo.chaos`), and :func:`run`, the ``kvroom demo`` command
(audit log, ``--metrics-port``, ``--json``).

Exit status 0 only when every room reached a terminal state, every Success
was verified byte for byte on decode (unless ``--no-verify``), no process
holds state for a terminal room, the audit log replays cleanly, and the raw
loop with equal work found every room it checked intact.  Figures never
decide the status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, TextIO

from kvroom.demo.chaos import DEFAULT_PLAN, Chaos
from kvroom.demo.cluster import Cluster, NodeError
from kvroom.demo.compare import raw_phase
from kvroom.demo.ledger import Ledger
from kvroom.demo.report import NodeMetrics, Progress
from kvroom.demo.settings import model_of, node_options
from kvroom.demo.summary import RATIO_TARGET, RunFacts, as_json, figures, report
from kvroom.demo.workload import RoomSpec, make_rooms

__all__ = ["run", "Demo", "RATIO_TARGET"]

_options = node_options  # the name the soak test imports


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
        self.model = model_of(args)
        self.opts = node_options(args, audit_log)
        self.cluster = Cluster(self.opts)
        rooms = make_rooms(args.requests, args.decodes, args.min_pages, args.max_pages, args.seed)
        self.ledger = Ledger(self.cluster, rooms, args.concurrency)
        # (fraction of rooms done, step): abort | kill | stop
        default = DEFAULT_PLAN if args.chaos else []
        self.chaos = Chaos(
            self.cluster, self.ledger, audit_log, plan if plan is not None else default, args.seed
        )
        self.started = 0.0
        self.ended = 0.0
        self.raw: dict[str, Any] | None = None  # the raw loop without checks
        self.raw_equal: dict[str, Any] | None = None  # the raw loop with equal work
        self.figures: dict[str, Any] = {}

    @property
    def rooms(self) -> list[RoomSpec]:
        """Every room of the run."""
        return self.ledger.rooms

    @property
    def submitted(self) -> dict[int, str]:
        """Room -> the decode node it was given to."""
        return self.ledger.submitted

    def say(self, *parts: object, **kw: Any) -> None:
        """Print to the demo's human output."""
        print(*parts, file=self.out, **kw)

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
        ledger = self.ledger
        total = len(ledger.rooms)
        progress = Progress(total, self.out)
        self.started = time.monotonic()
        deadline = self.started + args.timeout
        shown = 0.0
        try:
            while True:
                ledger.submit_wave()
                self.cluster.pump(0.05)
                done = len(ledger.done_rooms())
                self.chaos.step(done / total)
                if time.monotonic() - shown >= 0.1 or done == total:  # the bar costs CPU
                    shown = time.monotonic()
                    progress.update(done, ledger.ok, ledger.moved)
                if done == total and not ledger.pending:
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
            self.raw, self.raw_equal = raw_phase(
                self.cluster, ledger.rooms, concurrency=args.concurrency, chunk_pages=args.chunk_pages,
                seed=args.seed, verify=self.opts.verify,
            )  # fmt: skip
        self.cluster.finish()
        return self.summary()

    def facts(self) -> RunFacts:
        """What the run did, for the summary."""
        return RunFacts(
            cluster=self.cluster,
            ledger=self.ledger,
            model=self.model,
            concurrency=self.args.concurrency,
            decodes=self.args.decodes,
            audit_log=self.audit_log,
            verify=self.opts.verify,
            seconds=self.ended - self.started,
            chaos_log=self.chaos.log,
            raw=self.raw,
            raw_equal=self.raw_equal,
        )

    def summary(self) -> int:
        """Print the summary; returns the exit status."""
        facts = self.facts()
        self.figures = figures(facts)
        return report(facts, self.figures, self.say)

    def as_json(self, status: int) -> dict[str, Any]:
        """The ``--json`` object."""
        return as_json(self.facts(), self.figures, status)


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
        print(json.dumps(demo.as_json(status)), flush=True)
    if server is not None:
        linger = getattr(args, "metrics_linger", 5.0)
        print(f"  serving final metrics for {linger:g} s more", file=out, flush=True)
        time.sleep(linger)
        server.shutdown()
        server.server_close()
    return status
