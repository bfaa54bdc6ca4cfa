"""Prometheus metrics: counts checked against what the rooms did (both managers in one process)."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from kvroom import KVManager, KVPoll, KVPool, KVReceiver, KVSender, ManagerConfig
from kvroom.fsm import Deadlines
from kvroom.observe.metrics import KVMetrics
from tests.test_api import wait

FAST = ManagerConfig(heartbeat_interval=0.1, heartbeat_timeout=1.0, deadlines=Deadlines(5.0, 10.0, 5.0))
PAGE_BYTES, LAYERS, AUX_BYTES = 256, 2, 16


def make_pool() -> KVPool:
    layers = [torch.zeros(64, PAGE_BYTES, dtype=torch.uint8) for _ in range(LAYERS)]
    return KVPool(layers, torch.zeros(8, AUX_BYTES, dtype=torch.uint8))


@pytest.fixture
def metered() -> Iterator[tuple[KVManager, KVManager, KVMetrics]]:
    metrics = KVMetrics()  # one registry of its own, shared by both managers
    prefill = KVManager("prefill", make_pool(), config=FAST, audit=False, metrics=metrics)
    decode = KVManager("decode", make_pool(), config=FAST, audit=False, metrics=metrics)
    yield prefill, decode, metrics
    prefill.close()
    decode.close()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_counts_match_the_rooms(metered: tuple[KVManager, KVManager, KVMetrics]) -> None:
    p, d, metrics = metered
    reg = metrics.registry
    pages = 5
    rx = KVReceiver(d, p.bootstrap_addr, 1)
    rx.init()
    tx = KVSender(p, p.bootstrap_addr, 1)
    rx.send_metadata(np.arange(pages) + 10, aux_index=1)
    assert wait(lambda: tx.poll() is KVPoll.WaitingForInput)
    assert value(reg, "kvroom_rooms", role="sender", state="WaitingForInput") == 1
    assert value(reg, "kvroom_peers", role="sender") == 1 and value(reg, "kvroom_peers", role="receiver") == 1
    tx.init(pages, aux_index=2)
    tx.send(np.arange(pages))
    assert wait(lambda: rx.poll() is KVPoll.Success and tx.poll() is KVPoll.Success)
    # a second room that fails: aborted by prefill before its page list came
    failing = KVSender(p, p.bootstrap_addr, 2)
    failing.abort()
    assert failing.poll() is KVPoll.Failed
    moved = pages * PAGE_BYTES * LAYERS + AUX_BYTES
    assert value(reg, "kvroom_bytes_written_total") == moved
    assert value(reg, "kvroom_bytes_received_total") == moved
    assert value(reg, "kvroom_rooms_created_total", role="sender") == 2
    assert value(reg, "kvroom_rooms_created_total", role="receiver") == 1
    ok = {"src": "Transferring", "dst": "Success", "trigger": "complete"}
    assert value(reg, "kvroom_room_transitions_total", role="sender", **ok) == 1
    assert value(reg, "kvroom_room_transitions_total", role="receiver", **ok) == 1
    assert value(reg, "kvroom_room_failures_total", role="sender", error="RoomAbortedError") == 1
    assert value(reg, "kvroom_room_latency_seconds_count", role="sender", outcome="Success") == 1
    assert value(reg, "kvroom_room_latency_seconds_count", role="sender", outcome="Failed") == 1
    left = {"Bootstrapping": 2, "WaitingForInput": 1, "Transferring": 1}  # the failed room left one
    for state, count in left.items():
        assert value(reg, "kvroom_room_state_seconds_count", role="sender", state=state) == count
    assert value(reg, "kvroom_rooms", role="sender", state="Success") == 1
    tx.clear()
    rx.clear()
    assert value(reg, "kvroom_rooms", role="sender", state="Success") == 0
    assert value(reg, "kvroom_rooms", role="receiver", state="Success") == 0


def test_several_managers_do_not_collide_and_off_means_no_observer() -> None:
    a, b = KVMetrics(), KVMetrics()
    assert a.registry is not b.registry
    m1 = KVManager("prefill", make_pool(), config=FAST, audit=False, metrics=a)
    m2 = KVManager("prefill", make_pool(), config=FAST, audit=False, metrics=b)
    m3 = KVManager("prefill", make_pool(), config=FAST, audit=False)
    try:
        KVSender(m1, m1.bootstrap_addr, 1)
        KVSender(m3, m3.bootstrap_addr, 1)
        assert value(a.registry, "kvroom_rooms_created_total", role="sender") == 1
        assert value(b.registry, "kvroom_rooms_created_total", role="sender") == 0
        assert m3._metrics is None
    finally:
        for m in (m1, m2, m3):
            m.close()
    assert value(a.registry, "kvroom_rooms", role="sender", state="Bootstrapping") == 0  # closed: detached


def test_served_over_http() -> None:
    metrics = KVMetrics()
    manager = KVManager("decode", make_pool(), config=FAST, audit=False, metrics=metrics)
    server, thread = metrics.serve(0)
    try:
        KVReceiver(manager, "127.0.0.1:1", 5)
        port = server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        manager.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    rooms = {
        s.labels["state"]: s.value for s in families["kvroom_rooms"].samples if s.labels["role"] == "receiver"
    }
    assert rooms["Bootstrapping"] == 1
