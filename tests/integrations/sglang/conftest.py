"""Fixtures: SGLang scheduler ranks as real processes, always reaped."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.integrations.sglang.node import Node


@pytest.fixture
def make_node() -> Iterator[Callable[[str], Node]]:
    """Start rank processes that are killed when the test ends, pass or fail."""
    nodes: list[Node] = []

    def build(name: str) -> Node:
        node = Node(name)
        nodes.append(node)
        return node

    yield build
    for node in nodes:
        node.kill()
        assert not node.alive(), f"{node.name} outlived its test"
