"""Shared fixtures: clusters of real prefill/decode processes, always reaped."""

from __future__ import annotations

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
