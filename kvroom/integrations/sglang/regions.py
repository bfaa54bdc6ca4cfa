"""SGLang's ``KVArgs`` as kvroom raw regions: a :class:`~kvroom.planning.RankRegions` per rank.

SGLang hands a transfer backend raw pointers; kvroom's core registers raw
regions, so nothing is copied or aliased: every pointer becomes a
:class:`~kvroom.transport.regions.Region` (address, length, item size, memory
kind, device), and the rank's share of the model a
:class:`~kvroom.planning.RankLayout` the planner maps onto the peer's.  The
model is described in bytes (``uint8`` elements), which is all the planner
slices by:

- **KV** (``kv_data_ptrs``): an MHA pool's ``K_0..K_{n-1}, V_0..V_{n-1}``
  become buffers ``k.L`` and ``v.L`` of ``total_kv_head_num`` heads (a rank
  holds ``kv_head_num`` of them, or one replica when there are fewer heads
  than TP ranks); an MLA pool's one latent per layer becomes ``kv.L``, one
  "head" every rank holds, so exactly one prefill rank writes each decode
  rank.  ``L`` is the global layer: ``kv_layer_ids`` when SGLang gives them
  (hybrid pools), else ``prefill_start_layer`` onwards.
- **Aux** (``aux_data_ptrs``): SGLang's metadata buffers, each its own aux
  region ``aux.i`` with its own row size; a request's aux index is one row in
  every one of them, written straight into decode's buffers with the last chunk.
- **State** (``state_data_ptrs`` per ``state_types``): mamba rows (one per
  request per state tensor per layer, ``mamba.T.L``), sliced over TP the way
  SGLang's heterogeneous-TP path slices them (``state_dim_per_tensor``,
  ``state_conv_shard_groups``, ``state_slice_outer_counts``); sliding-window
  pages (``swa_k.i``/``swa_v.i``, the ``swa`` page list), sliced like KV.
- **Memory**: ``kv_data_mem_kinds`` when SGLang sets it, else VRAM on
  ``gpu_id`` when CUDA is available, else DRAM; aux buffers are host memory.

Refused with :class:`Unsupported` naming the feature (never moved wrong):
state types other than mamba and SWA (DSA, QSA, MiniMax, DeepSeek-V4 rings,
block scales, request rows), speculative-decoding draft KV (KVArgs does not
say the draft model's heads), SWA state with pipeline-parallel prefill (its
buffers carry no layer ids), and DeepSeek-V4's compressed-MLA pools.

The staging ring (``KVROOM_STAGING_PAGES``) exists only on kvroom's tensor
pools: :mod:`kvroom.integrations.sglang.staging` builds one instead.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from kvroom.planning import Buffer, ModelLayout, RankLayout, RankRegions, Section, attention_buffers
from kvroom.transport.regions import Region, RegionPool

__all__ = [
    "STATE_SPACES",
    "RankShape",
    "Unsupported",
    "check_supported",
    "model_layers",
    "regions_from_kv_args",
]

STATE_SPACES = {"mamba": "mamba", "swa": "swa"}
"""SGLang state types kvroom moves, and the kvroom index space of each."""


class Unsupported(NotImplementedError):
    """A KVArgs feature kvroom cannot transfer (the message names it)."""


@dataclass(frozen=True)
class RankShape:
    """Where this scheduler sits: attention TP rank of size, PP stage of size, MLA or not."""

    tp_rank: int
    tp_size: int
    pp_rank: int = 0
    pp_size: int = 1
    is_mla: bool = False


def _ints(values: Any) -> list[int]:
    return [int(v) for v in (values or [])]


def _value(kind: Any) -> str:
    return str(getattr(kind, "value", kind))


def mem_kinds(args: Any, count: int) -> list[tuple[str, int]]:
    """(memory kind, device) of each of the first ``count`` KV buffers.

    ``KVArgs.kv_data_mem_kinds`` when SGLang sets it (its decode does), else
    VRAM on ``gpu_id`` when CUDA is available, else DRAM.
    """
    kinds = [str(k).upper() for k in (getattr(args, "kv_data_mem_kinds", None) or [])]
    device = int(getattr(args, "gpu_id", 0) or 0)
    if not kinds:
        kinds = ["VRAM" if torch.cuda.is_available() else "DRAM"] * count
    kinds += kinds[-1:] * (count - len(kinds))
    return [(k, device if k == "VRAM" else 0) for k in kinds[:count]]


def check_supported(args: Any) -> None:
    """Raise :class:`Unsupported` naming a KVArgs feature kvroom cannot move."""
    if int(getattr(args, "num_draft_entries", 0) or 0):
        raise Unsupported(
            "kvroom's SGLang backend does not transfer speculative-decoding draft KV buffers: "
            "KVArgs does not say the draft model's KV heads, so they cannot be sliced across TP"
        )
    if getattr(args, "mla_compression_ratios", None):
        raise Unsupported("kvroom's SGLang backend does not transfer DeepSeek-V4 compressed-MLA pools")
    for kind, ptrs in zip(
        getattr(args, "state_types", None) or [], state_lists(args, "data_ptrs"), strict=False
    ):
        if ptrs and _value(kind) not in STATE_SPACES:
            raise Unsupported(
                f"kvroom's SGLang backend does not transfer {_value(kind)!r} state buffers "
                f"(it moves {', '.join(STATE_SPACES)} state)"
            )


def state_lists(args: Any, field: str) -> list[list[Any]]:
    """``KVArgs.state_<field>`` as one list per state component (empty when unset)."""
    return [list(v or []) for v in (getattr(args, f"state_{field}", None) or [])]


def _kv_layer_ids(args: Any, per_layer: int, start: int) -> list[int]:
    count = len(args.kv_data_ptrs)
    ids = _ints(getattr(args, "kv_layer_ids", None))
    if ids:
        if len(ids) != count:
            raise ValueError(f"KVArgs.kv_layer_ids has {len(ids)} entries for {count} KV buffers")
        return ids
    if count % per_layer:
        raise ValueError(f"{count} KV buffers are not {per_layer} per layer")
    return [start + i for i in range(count // per_layer)] * per_layer


def model_layers(args: Any, per_layer: int) -> int:
    """Layers of the model this rank's buffers imply when it holds them all (no PP)."""
    ids = _kv_layer_ids(args, per_layer, 0)
    for layer_ids in state_lists(args, "layer_ids"):
        ids += _ints(layer_ids)
    return max(ids) + 1 if ids else 0


def _sliced(heads_here: int, tp_size: int, what: str) -> int:
    """Total heads when each of ``tp_size`` ranks holds ``heads_here`` of them."""
    if heads_here <= 0:
        raise ValueError(f"{what}: a rank holds no heads")
    return heads_here * tp_size


def _mamba(args: Any, k: int, shape: RankShape, mem: tuple[str, int]) -> tuple[list[Buffer], list[Region]]:
    ptrs, lens = _ints(args.state_data_ptrs[k]), _ints(args.state_data_lens[k])
    items = _ints(args.state_item_lens[k])
    layer_ids = _ints(state_lists(args, "layer_ids")[k] if k < len(state_lists(args, "layer_ids")) else [])
    dims = _ints(
        state_lists(args, "dim_per_tensor")[k] if k < len(state_lists(args, "dim_per_tensor")) else []
    )
    outer = _ints(
        state_lists(args, "slice_outer_counts")[k] if k < len(state_lists(args, "slice_outer_counts")) else []
    )
    groups_all = state_lists(args, "conv_shard_groups")
    groups = groups_all[k] if k < len(groups_all) else []
    if len(layer_ids) != len(ptrs):
        raise ValueError(f"mamba state: {len(layer_ids)} layer ids for {len(ptrs)} state buffers")
    seen: Counter[int] = Counter()
    buffers: list[Buffer] = []
    regions: list[Region] = []
    for j, (ptr, length, item, layer) in enumerate(zip(ptrs, lens, items, layer_ids, strict=True)):
        tensor = seen[layer]
        seen[layer] += 1
        rows = outer[j] if j < len(outer) and outer[j] > 0 else 1
        dim = dims[j] if j < len(dims) else 0
        name = f"mamba.{tensor}"
        if dim <= 0:  # replicated over attention TP: one source writes it whole
            sections: tuple[Section, ...] = (Section(1, item),)
            rows = 1
        else:
            if item % (rows * dim):
                raise ValueError(f"{name}.{layer}: a {item}-byte row is not {rows} x {dim} channels")
            unit = item // (rows * dim)
            sub = groups[j] if j < len(groups) and groups[j] else None
            if sub:
                if sum(int(g) for g in sub) != dim * shape.tp_size:
                    raise ValueError(f"{name}.{layer}: conv groups {sub} do not add up to {dim} x TP")
                sections = tuple(Section(int(g), unit) for g in sub)
            else:
                sections = (Section(_sliced(dim, shape.tp_size, name), unit),)
        buffers.append(Buffer(name, layer, "mamba", rows, sections, "uint8"))
        regions.append(Region(f"{name}.{layer}", ptr, (length // item) * item, item, *mem))
    return buffers, regions


def _swa(
    args: Any, k: int, shape: RankShape, heads: tuple[int, int] | None, mem: tuple[str, int]
) -> tuple[list[Buffer], list[Region]]:
    if shape.pp_size > 1:
        raise Unsupported(
            "kvroom's SGLang backend does not transfer sliding-window state with pipeline-parallel "
            "prefill (SGLang gives its buffers no layer ids)"
        )
    ptrs, lens, items = (
        _ints(args.state_data_ptrs[k]),
        _ints(args.state_data_lens[k]),
        _ints(args.state_item_lens[k]),
    )
    if len(ptrs) % 2:
        raise ValueError(f"{len(ptrs)} sliding-window buffers are not K and V per layer")
    half = len(ptrs) // 2
    page_size = int(args.page_size)
    buffers: list[Buffer] = []
    regions: list[Region] = []
    for j, (ptr, length, item) in enumerate(zip(ptrs, lens, items, strict=True)):
        name = f"swa_{'kv'[j // half]}{j % half}"
        local, total = heads if heads is not None else (1, 1)
        if item % (page_size * local):
            raise ValueError(f"{name}: a {item}-byte page does not split into {page_size} x {local} heads")
        section = (Section(total, item // (page_size * local)),)
        buffers.append(Buffer(name, None, "swa", page_size, section, "uint8"))
        regions.append(Region(name, ptr, (length // item) * item, item, *mem))
    return buffers, regions


def _all_layers(held: list[Buffer], layers: int, hybrid: bool) -> list[Buffer]:
    """A pipeline stage's KV buffers extended to the model's every layer (one geometry per name)."""
    if hybrid:
        raise Unsupported(
            "kvroom's SGLang backend does not support pipeline-parallel prefill of hybrid models: "
            "KVArgs lists this stage's layer kinds only, and every stage must describe the whole model"
        )
    shapes: dict[str, Buffer] = {}
    for b in held:
        first = shapes.setdefault(b.name, b)
        if first.shape != b.shape:
            raise ValueError(f"KV buffer {b.key!r}: its page geometry differs from {first.key!r}'s")
    return [
        Buffer(b.name, x, b.space, b.rows, b.sections, b.dtype)
        for b in shapes.values()
        for x in range(layers)
    ]


def regions_from_kv_args(
    args: Any, shape: RankShape, layers: int, kv_heads: tuple[int, int] | None = None
) -> RankRegions:
    """This rank's regions and layout from SGLang's ``KVArgs``.

    ``layers``: the model's layer count (prefill and decode must agree);
    ``kv_heads``: (heads this rank holds, the model's total KV heads), for
    MHA pools.  Raises :class:`Unsupported` for what kvroom cannot move and
    ValueError for inconsistent KVArgs.
    """
    check_supported(args)
    page_size = int(args.page_size)
    per_layer = 1 if shape.is_mla else 2
    start = int(getattr(args, "prefill_start_layer", 0) or 0) if shape.pp_size > 1 else 0
    layer_ids = _kv_layer_ids(args, per_layer, start)
    ptrs, lens, items = _ints(args.kv_data_ptrs), _ints(args.kv_data_lens), _ints(args.kv_item_lens)
    mems = mem_kinds(args, len(ptrs))
    buffers: list[Buffer] = []
    kv: list[Region] = []
    half = len(ptrs) // per_layer
    for j, (ptr, length, item, layer) in enumerate(zip(ptrs, lens, items, layer_ids, strict=True)):
        if shape.is_mla:
            name, local, total = "kv", 1, 1
        else:
            if kv_heads is None:
                raise ValueError("an MHA pool needs this rank's and the model's KV head counts")
            name, (local, total) = ("k" if j < half else "v"), kv_heads
        if item % (page_size * local):
            raise ValueError(
                f"{name}.{layer}: a {item}-byte page does not split into {page_size} x {local} heads"
            )
        dim = item // (page_size * local)
        buffers += attention_buffers([layer], page_size, total, dim, "uint8", names=(name,))
        kv.append(Region(f"{name}.{layer}", ptr, (length // item) * item, item, *mems[j]))
    aux_buffers: list[Buffer] = []
    aux: list[Region] = []
    aux_items = _ints(args.aux_item_lens)
    rows = min(n // i for n, i in zip(_ints(args.aux_data_lens), aux_items, strict=True)) if aux_items else 0
    for j, (ptr, item) in enumerate(zip(_ints(args.aux_data_ptrs), aux_items, strict=True)):
        aux_buffers.append(Buffer(f"aux.{j}", None, "aux", 1, (Section(1, item),), "uint8"))
        aux.append(Region(f"aux.{j}", ptr, rows * item, item))
    state_buffers: list[Buffer] = []
    state: list[Region] = []
    for k, kind in enumerate(getattr(args, "state_types", None) or []):
        if not args.state_data_ptrs[k]:
            continue
        mem = mems[0] if mems else ("DRAM", 0)
        if _value(kind) == "mamba":
            got = _mamba(args, k, shape, mem)
        else:
            got = _swa(args, k, shape, None if shape.is_mla else kv_heads, mem)
        state_buffers += got[0]
        state += got[1]
    if shape.pp_size > 1:  # the model's every layer, this stage's range of them
        buffers = _all_layers(
            buffers, layers, bool(state_buffers) or bool(_ints(getattr(args, "kv_layer_ids", None)))
        )
        end = getattr(args, "prefill_end_layer", None)
        lo, hi = start, int(end) if end else start + len(layer_ids) // per_layer
    else:
        lo, hi = 0, layers
    model = ModelLayout(layers, page_size, tuple(buffers + state_buffers + aux_buffers))
    rank = RankLayout(model, shape.tp_rank, shape.tp_size, shape.pp_rank, shape.pp_size, lo, hi)
    return RankRegions(rank, RegionPool(tuple(kv), tuple(aux), tuple(state)))
