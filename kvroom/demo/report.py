"""What the demo shows while it runs and after: progress, figures, and its nodes' metrics.

* :class:`Progress`: a live ``tqdm`` bar (rooms, bytes, rate) on a terminal;
  a plain line every ``interval`` seconds when the output is not a terminal.
* :class:`NodeMetrics`: a Prometheus collector that serves the metric families
  each node process last sent (with a ``node`` label), so one ``/metrics``
  endpoint in the demo's own process covers the whole cluster.
* :func:`percentile`: the p50/p99 the summary prints.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any, TextIO

from prometheus_client.metrics_core import Metric

__all__ = ["Progress", "NodeMetrics", "percentile"]


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` (median for 0.5); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if q == 0.5:
        return float(statistics.median(ordered))
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Progress:
    """Rooms done, bytes moved and the rate, on ``stream``."""

    def __init__(self, total: int, stream: TextIO, *, interval: float = 1.0) -> None:
        self.total = total
        self.stream = stream
        self.interval = interval
        self.started = time.monotonic()
        self._last = 0.0
        self._bar: Any = None
        if stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="room", file=stream, dynamic_ncols=True, leave=True)

    def update(self, done: int, ok: int, moved: int) -> None:
        """Report ``done`` rooms (``ok`` of them verified on decode) and ``moved`` bytes."""
        now = time.monotonic()
        rate = moved / max(now - self.started, 1e-9) / 1e9
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(f"ok {ok}, {moved / 2**20:.0f} MiB, {rate:.2f} GB/s", refresh=False)
            self._bar.refresh()
            return
        if now - self._last >= self.interval or done == self.total:
            self._last = now
            print(
                f"  rooms {done:5d}/{self.total}  decode ok {ok:5d}  "
                f"{moved / 2**20:8.1f} MiB  {rate:6.2f} GB/s",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class NodeMetrics:
    """Collector of the metric families the demo's nodes sent, labelled by node.

    A node that finished serves its final families; one still running, its latest.
    """

    def __init__(self, nodes: Any) -> None:
        self._nodes = nodes  # a callable returning the cluster's nodes

    def collect(self) -> Iterator[Metric]:
        """Merge every node's families, adding a ``node`` label to each sample."""
        merged: dict[str, Metric] = {}
        for node in list(self._nodes()):
            families = (node.final or {}).get("metrics") or node.metrics or []
            for family in families:
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for sample in family.samples:
                    out.samples.append(sample._replace(labels={**sample.labels, "node": node.name}))
        yield from merged.values()
