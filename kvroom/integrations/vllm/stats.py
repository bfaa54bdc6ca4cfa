"""Connector stats for vLLM's stats hooks: rooms by state, failures by cause, bytes, latency.

A worker returns one :class:`KVRoomStats` per step from
``get_kv_connector_stats``; vLLM aggregates them across workers and steps
(``aggregate``) and logs ``reduce()`` per interval.  Counters add up;
``live_*`` (rooms open now, by state) is a gauge, so aggregation keeps the
largest value seen.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

__all__ = ["KVRoomStats", "new_data"]


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
        return self

    def reduce(self) -> dict[str, int | float]:
        """One interval as flat numbers for vLLM's logger."""
        data = self.data
        out: dict[str, int | float] = {f"rooms_{k}": v for k, v in sorted(data["ended"].items())}
        out.update({f"live_{k}": v for k, v in sorted(data["live"].items())})
        out.update({f"failed_{k}": v for k, v in sorted(data["failures"].items())})
        out["bytes"] = data["bytes"]
        lat = sorted(data["latency_s"])
        if lat:
            out["latency_p50_ms"] = round(1000 * lat[len(lat) // 2], 3)
            out["latency_max_ms"] = round(1000 * lat[-1], 3)
        return out

    def is_empty(self) -> bool:
        """True when nothing happened in the interval."""
        data = self.data
        return not (data["ended"] or data["failures"] or data["bytes"] or any(data["live"].values()))
