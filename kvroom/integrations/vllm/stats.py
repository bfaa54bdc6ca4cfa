"""Connector stats for vLLM's stats hooks: rooms by state, failures by cause, bytes, latency.

A worker returns one :class:`KVRoomStats` per step from
``get_kv_connector_stats``; vLLM aggregates them across workers and steps
(``aggregate``) and logs ``reduce()`` per interval.  Counters add up;
``live_*`` (rooms open now, by state) is a gauge, so aggregation keeps the
largest value seen.  The scheduler-side connector adds ``held`` (requests whose
blocks it keeps for a room) whenever that number changes.

:class:`KVRoomPromMetrics` puts the same figures on vLLM's ``/metrics``:
``vllm:kvroom_rooms_total{state}``, ``vllm:kvroom_failures_total{cause}``,
``vllm:kvroom_bytes_total`` (what moved: blocks past decode's prefix hit, and aux
rows), and the gauges ``vllm:kvroom_live_rooms`` (rooms open in the workers) and
``vllm:kvroom_held_requests`` (requests the scheduler-side connector holds).
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.utils import create_metric_per_engine

__all__ = ["KVRoomStats", "KVRoomPromMetrics", "new_data"]


def new_data() -> dict[str, Any]:
    """An empty stats payload (plain data: it crosses process boundaries)."""
    return {"ended": {}, "live": {}, "failures": {}, "bytes": 0, "latency_s": []}


def _add(into: dict[str, int], other: dict[str, int]) -> None:
    for key, value in other.items():
        into[key] = into.get(key, 0) + value


class KVRoomStats(KVConnectorStats):  # type: ignore[misc]
    """kvroom's per-interval transfer stats (see the module docstring)."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        super().__init__(data=data or new_data())

    def reset(self) -> None:
        """Start a new interval."""
        self.data = new_data()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        """Add ``other``'s counters to ours (gauges: the larger value)."""
        data = other.data
        if not data:
            return self
        _add(self.data["ended"], data.get("ended", {}))
        _add(self.data["failures"], data.get("failures", {}))
        live = self.data["live"]
        for state, count in data.get("live", {}).items():
            live[state] = max(live.get(state, 0), count)
        self.data["bytes"] += int(data.get("bytes", 0))
        self.data["latency_s"].extend(data.get("latency_s", []))
        if "held" in data:
            self.data["held"] = int(data["held"])
        return self

    def reduce(self) -> dict[str, int | float]:
        """One interval as flat numbers for vLLM's logger."""
        data = self.data
        out: dict[str, int | float] = {f"rooms_{k}": v for k, v in sorted(data["ended"].items())}
        out.update({f"live_{k}": v for k, v in sorted(data["live"].items())})
        out.update({f"failed_{k}": v for k, v in sorted(data["failures"].items())})
        out["bytes"] = data["bytes"]
        if "held" in data:
            out["held_requests"] = data["held"]
        lat = sorted(data["latency_s"])
        if lat:
            out["latency_p50_ms"] = round(1000 * lat[len(lat) // 2], 3)
            out["latency_max_ms"] = round(1000 * lat[-1], 3)
        return out

    def is_empty(self) -> bool:
        """True when nothing happened in the interval."""
        data = self.data
        return not (
            data["ended"] or data["failures"] or data["bytes"] or any(data["live"].values()) or "held" in data
        )


class KVRoomPromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]
    """kvroom's connector figures on vLLM's Prometheus endpoint (see the module docstring)."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter: Any = self._counter_cls  # vLLM's metric classes (typed as their union)
        gauge: Any = self._gauge_cls
        self._rooms: Any = counter(
            name="vllm:kvroom_rooms_total",
            documentation="kvroom rooms ended, by final state.",
            labelnames=[*labelnames, "state"],
        )
        self._failures: Any = counter(
            name="vllm:kvroom_failures_total",
            documentation="kvroom rooms failed, by cause.",
            labelnames=[*labelnames, "cause"],
        )
        bytes_total = counter(
            name="vllm:kvroom_bytes_total",
            documentation="Bytes kvroom moved for rooms that succeeded (blocks past decode's prefix hit).",
            labelnames=labelnames,
        )
        live = gauge(
            name="vllm:kvroom_live_rooms",
            documentation="kvroom rooms open in the workers now.",
            labelnames=labelnames,
            multiprocess_mode="mostrecent",
        )
        held = gauge(
            name="vllm:kvroom_held_requests",
            documentation="Requests whose blocks kvroom's scheduler-side connector keeps for a room now.",
            labelnames=labelnames,
            multiprocess_mode="mostrecent",
        )
        per_engine: Any = create_metric_per_engine
        self._bytes: dict[int, Any] = per_engine(bytes_total, per_engine_labelvalues)
        self._live: dict[int, Any] = per_engine(live, per_engine_labelvalues)
        self._held: dict[int, Any] = per_engine(held, per_engine_labelvalues)
        for idx, values in per_engine_labelvalues.items():  # zeros are figures too
            self._live[idx].set(0)
            self._held[idx].set(0)
            self._rooms.labels(*values, "Success")
            self._rooms.labels(*values, "Failed")

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        """Record one step's (aggregated) stats payload."""
        data = transfer_stats_data
        values = self.per_engine_labelvalues[engine_idx]
        for state, count in data.get("ended", {}).items():
            self._rooms.labels(*values, state).inc(count)
        for cause, count in data.get("failures", {}).items():
            self._failures.labels(*values, cause).inc(count)
        if data.get("bytes"):
            self._bytes[engine_idx].inc(data["bytes"])
        if "live" in data and (data.get("ended") or data.get("live") or data.get("failures")):
            self._live[engine_idx].set(sum(data["live"].values()))
        if "held" in data:
            self._held[engine_idx].set(data["held"])
