"""The demo's progress display and its metrics collector, without processes."""

from __future__ import annotations

import io
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Counter, generate_latest

from kvroom.demo.report import NodeMetrics, Progress, percentile


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_live_bar_and_a_pipe_gets_plain_lines() -> None:
    tty, pipe = Terminal(), io.StringIO()
    for stream in (tty, pipe):
        progress = Progress(4, stream, interval=0.0)
        for done in range(5):
            progress.update(done, done, done << 20)
        progress.close()
    assert "\r" in tty.getvalue() and "4/4" in tty.getvalue() and "room/s" in tty.getvalue()
    lines = pipe.getvalue().splitlines()
    assert "\r" not in pipe.getvalue() and len(lines) == 5
    assert lines[-1].split()[:2] == ["rooms", "4/4"] and "MiB" in lines[-1] and "GB/s" in lines[-1]


def test_node_metrics_are_served_with_a_node_label() -> None:
    nodes = []
    for name, count in (("prefill", 3), ("decode0", 2)):
        registry = CollectorRegistry()
        Counter("kvroom_rooms_created", "x", ["role"], registry=registry).labels("sender").inc(count)
        nodes.append(SimpleNamespace(name=name, final=None, metrics=list(registry.collect())))
    nodes[1].final = {"metrics": nodes[1].metrics}  # a finished node serves its final families
    nodes[1].metrics = None
    served = CollectorRegistry()
    served.register(NodeMetrics(lambda: nodes))
    text = generate_latest(served).decode()
    assert 'kvroom_rooms_created_total{node="prefill",role="sender"} 3.0' in text
    assert 'kvroom_rooms_created_total{node="decode0",role="sender"} 2.0' in text
    assert text.count("# TYPE kvroom_rooms_created_total counter") == 1  # one family, merged


def test_percentile() -> None:
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(100)], 0.99) == 99.0
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN
