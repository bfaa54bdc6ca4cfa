"""Shared fixtures: clusters of real prefill/decode processes, always reaped."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvroom.demo.cluster import Cluster
from kvroom.demo.nodes import NodeOptions

TRANSPORTS = {"default": {}, "tcp": {"UCX_TLS": "tcp"}}


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., Cluster]]:
    """Build clusters whose processes are killed when the test ends, pass or fail."""
    clusters: list[Cluster] = []

    def build(**options: Any) -> Cluster:
        defaults: dict[str, Any] = {"pool_pages": 512, "page_bytes": 16 << 10, "layers": 2, "aux_slots": 128}
        cluster = Cluster(NodeOptions(**{**defaults, **options}))
        clusters.append(cluster)
        return cluster

    yield build
    for cluster in clusters:
        cluster.close()
        for node in cluster.nodes:
            assert not node.alive(), f"{node.name} outlived its test"


def assert_clean(cluster: Cluster) -> None:
    """No terminal room left state behind; nothing escaped send()/poll()."""
    leaks = [(r.node, r.room, r.footprint) for r in cluster.results if r.footprint]
    assert not leaks, f"terminal rooms with state left: {leaks[:5]}"
    for node in cluster.nodes:
        assert not node.errors, f"{node.name}: {node.errors[0]}"
        if node.final is not None:
            assert not node.final["unexpected"], node.final["unexpected"][:3]


class LagMeter:
    """Measures how late this machine wakes a sleeping thread while a test runs.

    Timing assertions compare against configured deadlines plus a slack derived
    from what was observed, so a loaded machine stretches the bound and a quiet
    one keeps it tight: ``bound(x)`` is ``x`` plus four times the worst delay.
    """

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.worst = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lag-meter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            time.sleep(self.period)
            self.worst = max(self.worst, time.monotonic() - start - self.period)

    def bound(self, seconds: float) -> float:
        """``seconds`` plus the slack the observed scheduling delay calls for."""
        return seconds + 4 * self.worst

    def close(self) -> None:
        """Stop measuring."""
        self._stop.set()
        self._thread.join()


@pytest.fixture
def lag() -> Iterator[LagMeter]:
    """A :class:`LagMeter` running for the whole test."""
    meter = LagMeter()
    yield meter
    meter.close()
