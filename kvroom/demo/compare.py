"""The demo's raw NIXL phase, from the parent: the same rooms' bytes, twice, between the same processes.

Once the rooms ran, the parent drives the (now idle) node processes through
two plain NIXL WRITE loops over bare agents on the very tensors of their
kvroom pools, and :mod:`kvroom.demo.summary` compares kvroom's GB/s with each:

1. every decode opens its agent (``raw_open``) and prefill runs the loop
   *without checks* (``raw_run``, :func:`kvroom.demo.raw.raw_writes`): the
   bytes only, and one median room's time alone;
2. prefill opens its agent, the decodes load its metadata and start checking
   (``raw_peer``), and prefill runs the loop *with equal work*
   (``raw_equal``, :func:`kvroom.demo.raw_equal.equal_work_writes`): the
   same per-room stamps and byte checks as kvroom's run, on the same sides
   (or none, as in kvroom's run, with ``--no-verify``);
3. everything closes (``raw_close``); each decode reports what it checked.

Nodes answer each step with one ``("raw", info)`` message, kept in ``Node.raw``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kvroom.demo.cluster import Cluster, Node
from kvroom.demo.report import percentile
from kvroom.demo.workload import RoomSpec

__all__ = ["raw_phase"]


def _ask(cluster: Cluster, nodes: Iterable[Node], kind: str, arg: Any, timeout: float) -> bool:
    """Send ``kind`` to ``nodes`` and pump until each answered (False: one did not in time)."""
    nodes = list(nodes)
    for node in nodes:
        node.raw = None
        node.send(kind, arg)
    return cluster.wait_until(
        lambda: all(n.raw is not None or not n.alive() for n in nodes), timeout
    ) and all(n.raw is not None for n in nodes)


def raw_phase(
    cluster: Cluster, rooms: list[RoomSpec], *, concurrency: int, chunk_pages: int, seed: int, verify: bool
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The loop without checks and the loop with equal work: their results (None: not measured)."""
    prefill = cluster.prefill
    decodes = {i: n for i, n in cluster.decodes.items() if n.alive()}
    if prefill is None or not decodes or not prefill.alive():
        return None, None
    if not _ask(cluster, decodes.values(), "raw_open", None, 60):
        return None, None
    peers = {i: n.raw for i, n in decodes.items()}
    specs = [s for s in rooms if s.decode in decodes]
    sizes = [s.pages - s.prefix_pages for s in specs]
    median = int(percentile([float(n) for n in sizes], 0.5)) if sizes else 1
    plan = {
        "peers": peers,
        "rooms": [(s.decode, s.pages - s.prefix_pages) for s in specs],
        "concurrency": concurrency,
        "median_pages": median,
        "chunk_pages": chunk_pages,
        "seed": seed,
    }
    plain = prefill.raw if _ask(cluster, [prefill], "raw_run", plan, 300) else None
    if plain is not None:
        plain["median_pages"] = median
    equal = None
    if _ask(cluster, [prefill], "raw_open", None, 60):
        assert prefill.raw is not None
        if _ask(cluster, decodes.values(), "raw_peer", {"md": prefill.raw["md"], "verify": verify}, 60):
            work = {
                "peers": peers,
                "rooms": [(s.decode, s.room, s.prefix_pages, s.pages - s.prefix_pages) for s in specs],
                "concurrency": concurrency,
                "chunk_pages": chunk_pages,
                "seed": seed,
                "verify": verify,
            }
            equal = prefill.raw if _ask(cluster, [prefill], "raw_equal", work, 300) else None
        _ask(cluster, [prefill], "raw_close", None, 30)
    _ask(cluster, decodes.values(), "raw_close", None, 30)
    if equal is not None:
        if "seconds" not in equal:
            return plain, None
        checked: dict[str, int] = {}
        for node in decodes.values():
            for key, value in (node.raw or {}).items():
                if key != "closed":
                    checked[key] = checked.get(key, 0) + int(value)
        equal["decode"] = checked
    return plain, equal
