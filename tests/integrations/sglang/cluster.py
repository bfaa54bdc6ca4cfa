"""The test's side of the rank processes: :class:`Node` (one process), :class:`Cluster` (a deployment)."""

from __future__ import annotations

from typing import Any

from tests.integrations.sglang.node import SchedulerRank
from tests.ranks import Rank

__all__ = ["Cluster", "Node", "call_all", "free_port", "free_ports"]


class Node(Rank):
    """The test's end of one scheduler-rank process (a :class:`~tests.ranks.Rank` serving SGLang's calls)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, server=SchedulerRank)

    def call(self, method: str, *args: Any, timeout: float = 120.0, **kwargs: Any) -> Any:
        """Run ``method`` in the process (scheduler calls may wait on collectives)."""
        return super().call(method, *args, timeout=timeout, **kwargs)

    def result(self, method: str, timeout: float = 120.0) -> Any:
        """The answer to the last posted call."""
        return super().result(method, timeout)


def call_all(nodes: list[Node], method: str, *args: Any, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
    """The same call on every rank at once (collectives), answers in rank order."""
    for node in nodes:
        node.post(method, *args, **kwargs)
    return [node.result(method, timeout) for node in nodes]


def free_port() -> int:
    """One free TCP port on 127.0.0.1."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports below the kernel's ephemeral range.

    The ranks bind them seconds later (SGLang imports first); a port from the
    ephemeral range may meanwhile become the local end of any outgoing connection
    on the machine, and ports picked one at a time may repeat.
    """
    import random
    import socket
    from pathlib import Path

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    picked: list[int] = []
    for port in random.sample(range(20000, max(low, 20000 + 4 * count)), 4 * count + 64):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        picked.append(port)
        if len(picked) == count:
            return picked
    raise RuntimeError(f"no {count} free ports below {low}")


class Cluster:
    """Prefill ranks (rank 0 serves SGLang's bootstrap server) and decode instances, as processes.

    ``prefill`` lists the prefill ranks stage-major (``prefill_pp`` stages of
    ``prefill_tp`` ranks, one gloo group per stage); every rank runs ``family``.
    ``env`` goes to every rank; ``role_env["prefill"]`` / ``["decode"]`` to that role's on top.
    """

    def __init__(
        self,
        prefill_tp: int = 1,
        decode_tps: tuple[int, ...] = (1,),
        env: dict[str, str] | None = None,
        family: str = "mha",
        prefill_pp: int = 1,
        role_env: dict[str, dict[str, str]] | None = None,
    ):
        self.nodes: list[Node] = []
        port, *gloos = free_ports(1 + prefill_pp + len(decode_tps))
        self.addr = f"127.0.0.1:{port}"
        self.prefill = [self._node(f"prefill{r}") for r in range(prefill_tp * prefill_pp)]
        self.decodes = [[self._node(f"decode{i}.{r}") for r in range(tp)] for i, tp in enumerate(decode_tps)]
        penv = {**(env or {}), **(role_env or {}).get("prefill", {})}
        denv = {**(env or {}), **(role_env or {}).get("decode", {})}
        for stage in range(prefill_pp):
            gloo = gloos.pop()
            for r in range(prefill_tp):
                node = self.prefill[stage * prefill_tp + r]
                pp = (stage, prefill_pp)
                node.post(
                    "start", "prefill", r, prefill_tp, port, gloo, node is self.prefill[0], penv, family, pp
                )
        for group in self.decodes:
            gloo = gloos.pop()
            for r, node in enumerate(group):
                node.post("start", "decode", r, len(group), port, gloo, False, denv, family)
        for node in self.nodes:
            node.result("start", timeout=300)

    def _node(self, name: str) -> Node:
        node = Node(name)
        self.nodes.append(node)
        return node

    def close(self) -> None:
        """Kill every process; raises if one outlived it."""
        for node in self.nodes:
            node.kill()
        alive = [node.name for node in self.nodes if node.alive()]
        assert not alive, f"{alive} outlived the test"
