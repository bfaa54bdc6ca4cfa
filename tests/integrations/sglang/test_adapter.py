"""The adapter's own contract, in this process: the plugin's version warning and its hooks, KVArgs
as raw regions (MLA, replicated heads, mamba state sliced like SGLang, pipeline stages, VRAM with
its device id), and what kvroom cannot transfer refused with an error naming it."""

from __future__ import annotations

import logging
import types
from typing import Any

import pytest

pytest.importorskip("sglang")

import torch

from tests.integrations.sglang import shim

shim.install()

from kvroom.integrations.sglang import plugin  # noqa: E402
from kvroom.integrations.sglang.regions import RankShape, Unsupported, regions_from_kv_args  # noqa: E402
from kvroom.integrations.sglang.staging import AuxPacker, pool_from_kv_args  # noqa: E402


def _hooks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, Any]]:
    from sglang.srt.plugins.hook_registry import HookRegistry

    seen: list[tuple[str, Any, Any]] = []
    monkeypatch.setattr(HookRegistry, "register", classmethod(lambda cls, t, h, k: seen.append((t, h, k))))
    return seen


def test_on_another_sglang_version_the_plugin_registers_and_names_the_tested_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen = _hooks(monkeypatch)
    monkeypatch.setattr(plugin, "_installed_version", lambda: "0.6.0")
    with caplog.at_level(logging.WARNING, logger="sglang.srt.disaggregation.kvroom"):
        plugin.register()
    assert "tested with sglang==0.5.23; this is sglang==0.6.0" in caplog.text
    assert [t for t, _, _ in seen] == [f"{plugin.UTILS}.TransferBackend", f"{plugin.UTILS}.get_kv_class"]
    from sglang.srt.arg_groups.choices import DISAGG_TRANSFER_BACKEND_CHOICES

    assert DISAGG_TRANSFER_BACKEND_CHOICES.count("kvroom") == 1


def test_on_the_tested_version_it_registers_quietly_and_keeps_every_other_backend(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen = _hooks(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="sglang.srt.disaggregation.kvroom"):
        plugin.register()
    assert "tested with" not in caplog.text
    enum_cls = seen[0][1]
    assert {m.value for m in enum_cls} >= {"mooncake", "nixl", "fake", "kvroom"}
    around = seen[1][1]
    assert around(lambda b, t: ("sglang's", b, t), enum_cls("nixl"), "manager") == (
        "sglang's",
        enum_cls("nixl"),
        "manager",
    )
    assert (
        around(None, enum_cls("kvroom"), types.SimpleNamespace(value="sender")).__name__ == "KvroomKVSender"
    )


def kv_args(layers: int = 2, heads: int = 2, **extra: Any) -> tuple[Any, list[torch.Tensor]]:
    """An MHA host pool's KVArgs: K and V of ``layers`` layers, ``heads`` heads here, 4-token pages."""
    keep = [torch.zeros(9 * 4, heads, 8, dtype=torch.float16) for _ in range(2 * layers)]
    meta = [torch.zeros(6, n, dtype=torch.uint8) for n in (16, 64)]
    args = types.SimpleNamespace(
        kv_data_ptrs=[t.data_ptr() for t in keep],
        kv_data_lens=[t.nbytes for t in keep],
        kv_item_lens=[t[0].nbytes * 4 for t in keep],
        aux_data_ptrs=[t.data_ptr() for t in meta],
        aux_data_lens=[t.nbytes for t in meta],
        aux_item_lens=[t[0].nbytes for t in meta],
        page_size=4,
        state_types=[],
        state_data_ptrs=[],
        num_draft_entries=0,
        kv_data_mem_kinds=["DRAM"] * len(keep),
    )
    args.__dict__.update(extra)
    return args, keep + meta


def test_a_staging_pool_aliases_sglangs_buffers_without_copying() -> None:
    args, keep = kv_args()
    aux = torch.zeros(4, 8, dtype=torch.uint8)
    pool = pool_from_kv_args(args, kv_heads=2, tp_rank=0, tp_size=1, aux=aux, staging_pages=8)
    assert [t.data_ptr() for t in pool.layers] == args.kv_data_ptrs
    assert pool.num_pages == 9 and pool.layout.layers == 4
    pool.layers[1][2, 3, 1].fill_(7)
    assert keep[1].view(torch.uint8).view(9, 4, 2, 16)[2, 3, 1].eq(7).all()


def test_kv_and_metadata_buffers_become_regions_at_sglangs_own_addresses() -> None:
    args, _ = kv_args()
    regions = regions_from_kv_args(args, RankShape(0, 1), layers=2, kv_heads=(2, 2))
    named = regions.pool.by_name()
    assert [named[k].addr for k in ("k.0", "k.1", "v.0", "v.1")] == args.kv_data_ptrs
    assert [named[f"aux.{i}"].item_bytes for i in (0, 1)] == [16, 64]  # a region per metadata buffer
    assert regions.items("aux") == 6 and regions.items("kv") == 9


def test_fewer_kv_heads_than_tp_ranks_are_replicas() -> None:
    args, _ = kv_args(heads=1)
    shares = [regions_from_kv_args(args, RankShape(r, 4), layers=2, kv_heads=(1, 2)).layout for r in range(4)]
    k0 = shares[0].model.by_key["k.0"]
    assert [s.heads(k0.sections[0]) for s in shares] == [(0, 1), (0, 1), (1, 2), (1, 2)]


def test_vram_buffers_are_declared_as_vram_on_their_gpu() -> None:
    args, _ = kv_args(kv_data_mem_kinds=["VRAM"] * 4, gpu_id=3)
    regions = regions_from_kv_args(args, RankShape(0, 1), layers=2, kv_heads=(2, 2))
    assert {(r.mem, r.device) for r in regions.pool.kv} == {("VRAM", 3)}
    assert {(r.mem, r.device) for r in regions.pool.aux} == {("DRAM", 0)}  # SGLang's metadata is host memory


def test_an_mla_pool_is_one_latent_per_layer_that_every_rank_holds() -> None:
    args, _ = kv_args()
    regions = regions_from_kv_args(args, RankShape(1, 2, is_mla=True), layers=4)
    assert sorted(b.key for b in regions.layout.buffers() if b.space == "kv") == [f"kv.{i}" for i in range(4)]
    assert regions.layout.heads(regions.layout.model.by_key["kv.0"].sections[0]) == (0, 1)


def test_a_hybrid_model_with_mla_attention_lists_one_latent_per_attention_layer() -> None:
    from sglang.srt.disaggregation.utils import DisaggregationMode

    from kvroom.integrations.sglang.manager import KvroomKVManager

    args, _keep = kv_args(layers=1, heads=1, kv_layer_ids=[1, 3], is_hybrid_mla_backend=True)
    server_args = types.SimpleNamespace(tp_size=1, dp_size=1, pp_size=1, host="127.0.0.1")
    server_args.disaggregation_bootstrap_port = 1
    manager = KvroomKVManager(args, DisaggregationMode.DECODE, server_args, False)  # as SGLang passes it
    try:
        assert manager.is_mla_backend
        assert sorted(k for k in manager.regions.regions if not k.startswith("aux")) == ["kv.1", "kv.3"]
        assert manager.regions.layout.model.layers == 4
    finally:
        manager.close()


def test_keys_from_the_environment_reach_kvrooms_manager(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SGLang has no per-backend settings: KVROOM_KEY_FILE / KVROOM_TRUSTED_KEYS carry the CURVE keys
    from sglang.srt.disaggregation.utils import DisaggregationMode

    from kvroom.integrations.sglang.manager import KvroomKVManager
    from kvroom.transport.auth import generate_keys

    generate_keys(tmp_path / "decode", "decode")
    generate_keys(tmp_path / "prefill", "prefill")
    monkeypatch.setenv("KVROOM_KEY_FILE", str(tmp_path / "decode" / "decode.key_secret"))
    monkeypatch.setenv("KVROOM_TRUSTED_KEYS", str(tmp_path / "prefill"))
    args, _keep = kv_args(layers=1, heads=1, total_kv_head_num=1)
    server_args = types.SimpleNamespace(tp_size=1, dp_size=1, pp_size=1, host="127.0.0.1")
    server_args.disaggregation_bootstrap_port = 1
    manager = KvroomKVManager(args, DisaggregationMode.DECODE, server_args, False)
    try:
        keys = manager.kv.config.keys
        assert keys is not None and len(keys.trusted) == 1
    finally:
        manager.close()
    monkeypatch.delenv("KVROOM_TRUSTED_KEYS")
    with pytest.raises(ValueError, match="needs both key_file"):
        KvroomKVManager(args, DisaggregationMode.DECODE, server_args, False)


def test_a_pipeline_stage_describes_every_layer_and_holds_its_own() -> None:
    args, _ = kv_args(layers=1, prefill_start_layer=1, prefill_end_layer=2, pp_rank=1)
    regions = regions_from_kv_args(args, RankShape(0, 1, 1, 2), layers=2, kv_heads=(2, 2))
    assert set(regions.layout.model.by_key) >= {"k.0", "k.1", "v.0", "v.1"}
    assert regions.layout.layers == (1, 2) and set(regions.regions) >= {"k.1", "v.1", "aux.0"}


def mamba(**extra: Any) -> tuple[Any, list[torch.Tensor]]:
    """A hybrid pool: attention at layer 1, conv and temporal state at layer 0 (TP rank of 2)."""
    from sglang.srt.disaggregation.utils import append_state_component

    args, keep = kv_args(layers=1, heads=1, kv_layer_ids=[1, 1], **extra)
    conv, ssm = torch.zeros(5, 8, 3, dtype=torch.bfloat16), torch.zeros(5, 2, 4, 4, dtype=torch.float32)
    args.__dict__.update(
        state_types=[], state_data_ptrs=[], state_data_lens=[], state_item_lens=[], state_dim_per_tensor=[],
        state_conv_shard_groups=[], state_slice_outer_counts=[], state_layer_ids=[],
    )  # fmt: skip
    tensors = [conv, ssm]
    append_state_component(
        args, "mamba", [t.data_ptr() for t in tensors], [t.nbytes for t in tensors],
        [t[0].nbytes for t in tensors], [8, 2], [[4, 4, 8], None], [1, 1], [0, 0],
    )  # fmt: skip
    return args, keep + tensors


def test_mamba_state_rows_are_sliced_over_tp_as_sglang_slices_them() -> None:
    args, _ = mamba()
    regions = regions_from_kv_args(args, RankShape(1, 2), layers=2, kv_heads=(1, 2))
    conv, ssm = regions.layout.model.by_key["mamba.0.0"], regions.layout.model.by_key["mamba.1.0"]
    assert [(s.heads, s.head_dim) for s in conv.sections] == [(4, 6), (4, 6), (8, 6)]  # q, k, v groups
    assert [regions.layout.heads(s) for s in conv.sections] == [(2, 4), (2, 4), (4, 8)]
    assert [(s.heads, s.head_dim) for s in ssm.sections] == [(4, 64)]
    assert regions.items("mamba") == 5 and regions.pool.role_of("mamba.1.0") == "state"


def test_sliding_window_pages_are_their_own_page_list_sliced_like_kv() -> None:
    window = [torch.zeros(5 * 4, 1, 8, dtype=torch.float16) for _ in range(2)]  # K and V, 5 pages
    args, _ = kv_args(heads=1)
    args.__dict__.update(
        state_types=["swa"],
        state_data_ptrs=[[t.data_ptr() for t in window]],
        state_data_lens=[[t.nbytes for t in window]],
        state_item_lens=[[t[0].nbytes * 4 for t in window]],
    )
    regions = regions_from_kv_args(args, RankShape(1, 2), layers=2, kv_heads=(1, 2))
    k = regions.layout.model.by_key["swa_k0"]
    assert k.space == "swa" and regions.layout.heads(k.sections[0]) == (1, 2)
    assert regions.items("swa") == 5 and regions.pool.by_name()["swa_v0"].addr == window[1].data_ptr()


@pytest.mark.parametrize(
    ("change", "shape", "names"),
    [
        ({"num_draft_entries": 2}, RankShape(0, 1), "draft KV"),
        ({"mla_compression_ratios": [0, 4]}, RankShape(0, 1), "compressed-MLA"),
        ({"state_types": ["dsa"], "state_data_ptrs": [[1234]]}, RankShape(0, 1), "'dsa' state"),
    ],
)
def test_what_kvroom_cannot_transfer_is_refused_by_name(
    change: dict[str, Any], shape: RankShape, names: str
) -> None:
    args, _ = kv_args(**change)
    with pytest.raises(Unsupported, match=names):
        regions_from_kv_args(args, shape, layers=2, kv_heads=(2, 2))


def test_hybrid_models_with_pipeline_parallel_prefill_are_refused_by_name() -> None:
    args, _ = mamba(prefill_start_layer=0, prefill_end_layer=2)
    with pytest.raises(Unsupported, match="pipeline-parallel prefill of hybrid models"):
        regions_from_kv_args(args, RankShape(0, 2, 0, 2), layers=4, kv_heads=(1, 2))


def test_the_staging_ring_refuses_state_and_device_memory_by_name() -> None:
    aux = torch.zeros(4, 8, dtype=torch.uint8)
    args, _ = mamba()
    with pytest.raises(Unsupported, match=r"staging ring .* state"):
        pool_from_kv_args(args, kv_heads=1, tp_rank=0, tp_size=1, aux=aux, staging_pages=8)
    args, _ = kv_args(kv_data_mem_kinds=["VRAM"] * 4)
    with pytest.raises(Unsupported, match=r"staging ring .* host"):
        pool_from_kv_args(args, kv_heads=2, tp_rank=0, tp_size=1, aux=aux, staging_pages=8)


def test_aux_rows_of_different_sizes_pack_into_one_slot_and_back() -> None:
    rows = [torch.arange(6 * n, dtype=torch.uint8).view(6, n) for n in (3, 64, 16)]
    packer = AuxPacker([r.data_ptr() for r in rows], [r.nbytes for r in rows], [r[0].nbytes for r in rows])
    packer.pack(4)
    assert packer.packed[4].tolist() == [*rows[0][4].tolist(), *rows[1][4].tolist(), *rows[2][4].tolist()]
    want = [r[4].clone() for r in rows]
    for r in rows:
        r.zero_()
    packer.unpack(4)
    assert all(torch.equal(r[4], w) for r, w in zip(rows, want, strict=True))
    assert all(int(r[3].sum()) == 0 for r in rows)  # only that row


def test_a_model_neither_on_disk_nor_cached_fails_the_manager_at_once_naming_it(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # decode without staging: KVArgs carries no head count, so kvroom must read the model's config
    import time

    from sglang.srt.disaggregation.utils import DisaggregationMode

    from kvroom.integrations.sglang.manager import KvroomKVManager

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache, and no network
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    args, _keep = kv_args(layers=1, heads=1)
    server_args = types.SimpleNamespace(tp_size=1, dp_size=1, pp_size=1, host="127.0.0.1")
    server_args.disaggregation_bootstrap_port, server_args.model_path = 1, "someone/not-downloaded-7b"
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"KV head count.*'someone/not-downloaded-7b' is neither a local"):
        KvroomKVManager(args, DisaggregationMode.DECODE, server_args, False)
    assert time.monotonic() - started < 5.0  # no hub retries (they took ~50 s)


def test_a_hub_models_config_is_read_from_the_cache_snapshot(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvroom.integrations.sglang.settings import local_model_path

    hub = tmp_path / "hub"
    snapshot = hub / "models--org--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    assert local_model_path("org/tiny", None) == str(snapshot)
    assert local_model_path(str(snapshot), None) == str(snapshot)  # a local path stays as it is
    assert local_model_path("org/absent", None) is None
