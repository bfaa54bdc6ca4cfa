"""``kvroom demo --chaos``: faults injected while rooms flow, at planned points of the run.

A plan is a list of (fraction of rooms done, step); :meth:`Chaos.step` runs
every step whose fraction the run has reached.  The steps:

* ``abort``: five rooms in flight aborted from prefill and five from their decode;
* ``kill``: a decode node SIGKILLed (its rooms are lost there: the ledger
  counts them done once prefill ended them), the kill written to the audit
  log, and the node restarted under a new name;
* ``stop``: a decode node SIGSTOPped past the 2 s transfer deadline, then resumed.

The default plan (``--chaos``) is abort, kill, stop, abort at 15/30/55/75 %;
the soak passes its own, seeded.  Each step leaves a line for the summary.
"""

from __future__ import annotations

import json
import random
import time

from kvroom.demo.cluster import Cluster, Node
from kvroom.demo.ledger import Ledger

__all__ = ["DEFAULT_PLAN", "Chaos"]

DEFAULT_PLAN = [(0.15, "abort"), (0.3, "kill"), (0.55, "stop"), (0.75, "abort")]
"""(fraction of rooms done, step) of ``--chaos``."""


def _log_kill(audit_log: str, node: Node) -> None:
    with open(audit_log, "a") as f:
        f.write(json.dumps({"event": "process.killed", "process": f"{node.name}-{node.pid}"}) + "\n")


class Chaos:
    """Runs a plan of faults against a cluster; ``log`` says what each step did."""

    def __init__(
        self, cluster: Cluster, ledger: Ledger, audit_log: str, plan: list[tuple[float, str]], seed: int
    ) -> None:
        self.cluster = cluster
        self.ledger = ledger
        self.audit_log = audit_log
        self.plan = sorted(plan)
        self.rng = random.Random(seed)
        self.log: list[str] = []

    def step(self, fraction: float) -> None:
        """Run every planned step due at ``fraction`` of the rooms done."""
        while self.plan and fraction >= self.plan[0][0]:
            _, step = self.plan.pop(0)
            {"abort": self.abort, "kill": self.kill, "stop": self.stop}[step]()

    def abort(self) -> None:
        """Abort five rooms in flight from prefill and five from their decode."""
        rooms = self.ledger.inflight()
        self.rng.shuffle(rooms)
        prefill = self.cluster.prefill
        assert prefill is not None
        for room in rooms[:5]:
            prefill.send("abort", room)
        by_name = {n.name: n for n in self.cluster.decodes.values()}
        for room in rooms[5:10]:
            node = by_name.get(self.ledger.submitted[room])
            if node is not None:
                node.send("abort", room)
        self.log.append(
            f"aborted {min(5, len(rooms))} rooms from prefill, {max(0, min(5, len(rooms) - 5))} from decode"
        )

    def kill(self) -> None:
        """SIGKILL a decode node and start a fresh one in its place."""
        index = self.rng.choice(sorted(self.cluster.decodes))
        node = self.cluster.decodes[index]
        self.cluster.kill(node)
        self.ledger.lost_node(node.name)
        _log_kill(self.audit_log, node)
        fresh = self.cluster.start_decode(index)
        self.log.append(f"killed {node.name} (pid {node.pid}) and restarted it as {fresh.name}")

    def stop(self) -> None:
        """SIGSTOP a decode node past the transfer deadline, then resume it."""
        node = self.cluster.decodes[self.rng.choice(sorted(self.cluster.decodes))]
        self.cluster.pause(node)
        pause = 2.0 + 1.0  # past the 2 s transfer deadline
        end = time.monotonic() + pause
        while time.monotonic() < end:
            self.cluster.pump(0.05)
        self.cluster.resume(node)
        self.log.append(f"stopped {node.name} for {pause:g} s (transfer deadline 2 s)")
