"""The connector's pure parts: params, the scheduler side's bookkeeping, stats, cache layouts."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

import torch
from vllm.v1.kv_cache_interface import KVCacheTensor, create_kv_cache_views
from vllm.v1.kv_cache_layout import KVCacheLayout

from kvroom.integrations.vllm.params import BOOTSTRAP_ADDR, ROOM, remote_decode_room, remote_prefill
from kvroom.integrations.vllm.pool import pool_from_caches
from kvroom.integrations.vllm.scheduler import RoomScheduler
from kvroom.integrations.vllm.stats import KVRoomStats
from tests.integrations.vllm.harness import BLOCK, BLOCKS, KV_HEADS, LAYER_NAMES, SPEC, kv_caches


@pytest.mark.parametrize(
    "params",
    [
        None,
        {},
        {"do_remote_prefill": True, ROOM: 3},  # no address
        {"do_remote_prefill": True, BOOTSTRAP_ADDR: "h:1"},  # no room
        {"do_remote_prefill": True, ROOM: "3", BOOTSTRAP_ADDR: "h:1"},  # a string room
        {"do_remote_prefill": True, ROOM: True, BOOTSTRAP_ADDR: "h:1"},
        {"do_remote_prefill": True, ROOM: 3, BOOTSTRAP_ADDR: ["h:1", 7]},
        {"do_remote_prefill": False, ROOM: 3, BOOTSTRAP_ADDR: "h:1"},
    ],
)
def test_incomplete_remote_prefill_params_mean_a_local_prefill(params: Any) -> None:
    assert remote_prefill(params) is None


def test_remote_params_parse() -> None:
    got = remote_prefill({"do_remote_prefill": True, ROOM: 3, BOOTSTRAP_ADDR: ["a:1", "b:2"]})
    assert got is not None and got.room == 3 and got.bootstrap_addr == ("a:1", "b:2")
    assert remote_decode_room({"do_remote_decode": True, ROOM: 9}) == 9
    assert remote_decode_room({"do_remote_decode": True}) is None


def _request(req_id: str, params: dict[str, Any] | None, status: str = "FINISHED_LENGTH_CAPPED") -> Any:
    return SimpleNamespace(
        request_id=req_id,
        kv_transfer_params=params,
        prompt_token_ids=list(range(40)),
        num_prompt_tokens=40,
        status=SimpleNamespace(name=status),
    )


def test_prefill_holds_blocks_only_for_a_completed_request() -> None:
    sched = RoomScheduler(True, BLOCK, ("h:1",))
    done = _request("a", {"do_remote_decode": True, ROOM: 1})
    assert sched.request_finished(done, [4, 5, 6, 7]) == (
        True,
        {"do_remote_prefill": True, "do_remote_decode": False, ROOM: 1, BOOTSTRAP_ADDR: ["h:1"]},
    )
    aborted = _request("b", {"do_remote_decode": True, ROOM: 2}, status="FINISHED_ABORTED")
    assert sched.request_finished(aborted, [8, 9, 10]) == (False, None)
    meta = sched.build_meta()
    assert [(s.req_id, s.pages) for s in meta.sends] == [("a", (4, 5, 6)), ("b", ())]
    assert sched.pending() and sched.held("a") == ["sending"] and sched.held("b") == []
    sched.update(SimpleNamespace(finished_sending={"a"}, finished_recving=None))
    assert not sched.pending() and sched.held("a") == []


def test_decode_abort_reported_in_the_same_step_leaves_nothing() -> None:
    sched = RoomScheduler(False, BLOCK)
    req = _request("d", {"do_remote_prefill": True, ROOM: 5, BOOTSTRAP_ADDR: "h:1"}, status="WAITING")
    assert sched.matched_tokens(req, 16) == (24, True)
    blocks = SimpleNamespace(get_block_ids=lambda: ([20, 21, 22],))
    sched.after_alloc(req, blocks, 24)
    assert req.kv_transfer_params["do_remote_prefill"] is False  # a recompute never waits again
    assert sched.matched_tokens(req, 0) == (0, False)
    (recv,) = sched.build_meta().recvs
    assert recv.pages == (21, 22) and recv.prefix_len == BLOCK
    sched.request_finished(req, [20, 21, 22])  # aborted: its room is to be aborted...
    sched.update(SimpleNamespace(finished_sending=None, finished_recving={"d"}))  # ...but it ended
    assert sched.held("d") == [] and sched.build_meta().empty() and not sched.pending()


def test_stats_add_counters_and_keep_the_largest_gauge() -> None:
    a = KVRoomStats({"ended": {"Success": 2}, "live": {"Transferring": 3}, "failures": {}, "bytes": 10,
                     "latency_s": [0.001]})  # fmt: skip
    b = KVRoomStats({"ended": {"Failed": 1}, "live": {"Transferring": 1}, "failures": {"PeerLostError": 1},
                     "bytes": 5, "latency_s": [0.003]})  # fmt: skip
    reduced = a.aggregate(b).reduce()
    assert reduced == {
        "rooms_Failed": 1,
        "rooms_Success": 2,
        "live_Transferring": 3,
        "failed_PeerLostError": 1,
        "bytes": 15,
        "latency_p50_ms": 3.0,
        "latency_max_ms": 3.0,
    }
    assert KVRoomStats().is_empty() and not a.is_empty()


def test_token_major_caches_become_head_aware_pages() -> None:
    caches = kv_caches(KVCacheLayout.LBNHC)
    pool = pool_from_caches(caches, BLOCK)
    assert pool.layout.kv_heads == KV_HEADS and pool.layout.page_size == BLOCK
    (name, cache), layer = next(iter(caches.items())), 0
    cache[5, 1, 3].fill_(42.0)  # block 5, head 1, token 3 in vLLM's logical view
    assert name == LAYER_NAMES[0] and bool((pool.page_view(layer)[5, 3, 1] == 42.0).all())


def test_head_major_caches_become_opaque_pages() -> None:
    pool = pool_from_caches(kv_caches(KVCacheLayout.LBHNC), BLOCK)
    assert pool.layout.kv_heads == 1 and pool.num_pages == BLOCKS


def test_interleaved_layers_are_refused_with_the_layout_to_use() -> None:
    page = SPEC.page_size_bytes
    raw = torch.zeros(page * BLOCKS * 2, dtype=torch.int8)
    shared = KVCacheTensor(size=raw.numel(), layers=LAYER_NAMES, layer_stride=page, block_stride=2 * page)
    views = create_kv_cache_views(raw, SPEC, BLOCKS, KVCacheLayout.BLNHC, shared)
    with pytest.raises(ValueError, match="LBNHC"):
        pool_from_caches(dict(zip(LAYER_NAMES, views, strict=True)), BLOCK)


def test_extra_config_passes_authentication_through(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvroom.integrations.vllm.connector import manager_config
    from kvroom.transport.auth import generate_keys

    for var in ("KVROOM_KEY_FILE", "KVROOM_TRUSTED_KEYS", "KVROOM_ALLOW_UNAUTHENTICATED"):
        monkeypatch.delenv(var, raising=False)
    generate_keys(tmp_path / "mine", "prefill")
    generate_keys(tmp_path / "peers", "decode")
    secret, peers = str(tmp_path / "mine" / "prefill.key_secret"), str(tmp_path / "peers")
    config = manager_config({"bootstrap_host": "10.0.0.7", "key_file": secret, "trusted_keys": peers})
    assert config.host == "10.0.0.7" and config.keys is not None and len(config.keys.trusted) == 1
    assert manager_config({}).keys is None and manager_config({}).allow_unauthenticated is False
    ticks = manager_config({"busy_poll_interval": "0.0005", "target_poll_interval": 0.002})
    assert (ticks.busy_poll_interval, ticks.target_poll_interval) == (0.0005, 0.002)
    monkeypatch.setenv("KVROOM_ALLOW_UNAUTHENTICATED", "true")  # the environment is the fallback
    assert manager_config({"bootstrap_host": "0.0.0.0"}).allow_unauthenticated is True
    assert manager_config({"allow_unauthenticated": False}).allow_unauthenticated is False
    with pytest.raises(ValueError, match="needs both key_file"):
        manager_config({"key_file": secret})


def test_sleep_mode_is_refused_where_vllm_has_it() -> None:
    """kvroom's NIXL registrations cannot follow sleep mode's remap: vLLM 0.33 refuses the pair.

    This CPU build cannot make a sleep-mode ModelConfig, so vLLM's own check runs on a config
    that has only the two fields it reads.
    """
    from vllm.config import KVTransferConfig, VllmConfig

    from kvroom.integrations.vllm import KVRoomConnector

    assert KVRoomConnector.supports_sleep_mode(None) is False
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    check = getattr(VllmConfig, "_verify_kv_transfer_compat", None)
    if check is None or not hasattr(KVConnectorBase_V1, "supports_sleep_mode"):
        pytest.skip("this vLLM has no sleep-mode hook for connectors (0.32)")
    transfer = KVTransferConfig(
        kv_connector="KVRoomConnector",
        kv_connector_module_path="kvroom.integrations.vllm",
        kv_role="kv_producer",
    )
    config = SimpleNamespace(
        model_config=SimpleNamespace(enable_sleep_mode=True), kv_transfer_config=transfer
    )
    with pytest.raises(ValueError, match="KVRoomConnector does not support sleep mode"):
        check(config)


def test_the_proxy_sends_decode_beside_prefill_by_default_for_kvroom_only() -> None:
    """kvroom takes decode's page list before prefill has the request; NixlConnector cannot."""
    from kvroom.integrations.vllm.proxy import Proxy

    assert Proxy(["http://p"], ["http://d"]).order == "concurrent"
    assert Proxy(["http://p"], ["http://d"], order="sequential").order == "sequential"
    assert Proxy(["http://p"], ["http://d"], connector="nixl").order == "sequential"
    with pytest.raises(ValueError, match="sequential order only"):
        Proxy(["http://p"], ["http://d"], connector="nixl", order="concurrent")
