"""The adapter's own contract, in this process: the plugin's version warning and its hooks, and the
KVArgs features kvroom's core cannot transfer yet refused with an error naming them."""

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
from kvroom.integrations.sglang.regions import AuxPacker, Unsupported, pool_from_kv_args  # noqa: E402


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


def kv_args(**extra: Any) -> tuple[Any, list[torch.Tensor]]:
    keep = [torch.zeros(9 * 4, 2, 8, dtype=torch.float16) for _ in range(4)]
    args = types.SimpleNamespace(
        kv_data_ptrs=[t.data_ptr() for t in keep],
        kv_data_lens=[t.nbytes for t in keep],
        kv_item_lens=[t[0].nbytes * 4 for t in keep],
        page_size=4,
        state_types=[],
        state_data_ptrs=[],
        num_draft_entries=0,
        kv_data_mem_kinds=["DRAM"] * 4,
    )
    args.__dict__.update(extra)
    return args, keep


def test_an_mha_pool_aliases_sglangs_buffers_without_copying() -> None:
    args, keep = kv_args()
    aux = torch.zeros(4, 8, dtype=torch.uint8)
    pool = pool_from_kv_args(args, kv_heads=2, tp_rank=0, tp_size=1, aux=aux)
    assert [t.data_ptr() for t in pool.layers] == args.kv_data_ptrs
    assert pool.num_pages == 9 and pool.layout.layers == 4
    pool.layers[1][2, 3, 1].fill_(7)
    assert keep[1].view(torch.uint8).view(9, 4, 2, 16)[2, 3, 1].eq(7).all()


@pytest.mark.parametrize(
    ("change", "is_mla", "pp_size", "names"),
    [
        ({}, True, 1, "MLA"),
        ({"state_data_ptrs": [[1234]], "state_types": ["mamba"]}, False, 1, "state buffers"),
        ({"num_draft_entries": 2}, False, 1, "draft KV"),
        ({}, False, 2, "pipeline-parallel"),
        ({"kv_data_mem_kinds": ["VRAM"] * 4}, False, 1, "VRAM"),
    ],
)
def test_what_the_core_cannot_transfer_yet_is_refused_by_name(
    change: dict[str, Any], is_mla: bool, pp_size: int, names: str
) -> None:
    args, _ = kv_args(**change)
    aux = torch.zeros(4, 8, dtype=torch.uint8)
    with pytest.raises(Unsupported, match=names):
        pool_from_kv_args(args, kv_heads=2, tp_rank=0, tp_size=1, aux=aux, is_mla=is_mla, pp_size=pp_size)


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
