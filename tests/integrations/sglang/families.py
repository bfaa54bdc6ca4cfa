"""One rank's SGLang memory pools per model family, as SGLang's pools allocate them, as CPU tensors.

* ``mha``: ``MHATokenToKVPool``: K and V ``[tokens, heads / tp, head_dim]`` per layer.
* ``mla``: ``MLATokenToKVPool``: one latent ``[tokens, 1, LATENT]`` per layer, identical on
  every TP rank (``is_mla_backend``; KVArgs carries no head counts).
* ``hybrid``: ``HybridLinearKVPool``: full attention at layers 1 and 3 (``kv_layer_ids``),
  mamba state at layers 0 and 2: a conv state ``[slots, conv_dim / tp, K - 1]`` whose channels
  are q, k and v groups each sliced over TP (``state_conv_shard_groups``) and a temporal state
  ``[slots, heads / tp, head_dim, state]``, listed tensor-major x layer as SGLang's
  ``MambaPool.get_contiguous_buf_infos`` lists them.
* any family at pipeline stage ``pp_rank`` of ``pp_size`` holds its layer range only.

Every element of prefill's buffers is a function of the buffer, the item (token or state
slot) and its *global* coordinate (head or channel) and its inner index, so decode checks each
byte against what the prefill item held whatever the TP split.
"""

from __future__ import annotations

from typing import Any

import torch

LAYERS, PAGE_SIZE, HEADS, HEAD_DIM, PAGES, AUX_ROWS = 2, 4, 4, 8, 48, 8
LATENT = 12  # MLA's kv_lora_rank + rope, in int32 elements here
SLOTS, CONV_GROUPS, TAPS, SSM_HEADS, SSM_INNER = 6, (4, 4, 8), 3, 4, 8
HYBRID_LAYERS = 4  # mamba at 0 and 2, full attention at 1 and 3
TOKENS = (PAGES + 1) * PAGE_SIZE  # SGLang's pools keep one extra page


def value(buffer: int, items: Any, coords: Any, inner: int) -> torch.Tensor:
    """Prefill's elements ``[items, coords, inner]`` of buffer number ``buffer`` (unique per element)."""
    i = torch.as_tensor(items).view(-1, 1, 1)
    c = torch.as_tensor(coords).view(1, -1, 1)
    d = torch.arange(inner).view(1, 1, -1)
    return (buffer * 100_000_000 + i * 100_000 + c * 100 + d + 1).to(torch.int32)


def heads_of(total: int, rank: int, size: int) -> list[int]:
    """The global heads TP rank ``rank`` of ``size`` holds (one replica when there are fewer)."""
    if total >= size:
        n = total // size
        return list(range(rank * n, (rank + 1) * n))
    return [rank // (size // total)]


def conv_channels(rank: int, size: int) -> list[int]:
    """Global conv channels rank ``rank`` holds, in its local order: its slice of q, then k, then v."""
    out, start = [], 0
    for group in CONV_GROUPS:
        n = group // size
        out += list(range(start + rank * n, start + (rank + 1) * n))
        start += group
    return out


class Pools:
    """The buffers of one rank: ``kv`` (per entry of ``kv_data_ptrs``) and ``state`` tensors."""

    def __init__(self, family: str, tp: tuple[int, int], pp: tuple[int, int]) -> None:
        self.family, (self.rank, self.size), (self.pp_rank, self.pp_size) = family, tp, pp
        layers = HYBRID_LAYERS if family == "hybrid" else LAYERS
        lo, hi = pp[0] * layers // pp[1], (pp[0] + 1) * layers // pp[1]
        self.layers = layers
        self.start = lo
        # (buffer id, global layer, tensor, coords on its sliced axis) per KV entry, K then V
        self.kv: list[tuple[int, int, torch.Tensor, list[int]]] = []
        self.state: list[tuple[int, int, torch.Tensor, list[int]]] = []
        if family == "mla":
            for layer in range(lo, hi):
                self.kv.append((layer, layer, torch.zeros(TOKENS, 1, LATENT, dtype=torch.int32), [0]))
            return
        attention = [x for x in range(lo, hi) if family != "hybrid" or x % 2]
        heads = heads_of(HEADS, self.rank, self.size)
        for kind in (0, 1):
            for layer in attention:
                t = torch.zeros(TOKENS, len(heads), HEAD_DIM, dtype=torch.int32)
                self.kv.append((10 + kind * 10 + layer, layer, t, heads))
        if family == "hybrid":
            mamba = [x for x in range(lo, hi) if not x % 2]
            channels = conv_channels(self.rank, self.size)
            ssm = heads_of(SSM_HEADS, self.rank, self.size)
            for layer in mamba:
                t = torch.zeros(SLOTS + 1, len(channels), TAPS, dtype=torch.int32)
                self.state.append((40 + layer, layer, t, channels))
            for layer in mamba:
                t = torch.zeros(SLOTS + 1, len(ssm), SSM_INNER, dtype=torch.int32)
                self.state.append((50 + layer, layer, t, ssm))

    def fill(self) -> None:
        """Prefill: every item holds its pattern."""
        for buffer, _, t, coords in self.kv + self.state:
            t.copy_(value(buffer, range(t.shape[0]), coords, t.shape[2]))

    def fill_kv_args(self, args: Any) -> None:
        """The KV and state fields ``_init_kv_manager`` and ``setup_state_kv_args`` set."""
        bufs = [t for _, _, t, _ in self.kv]
        args.kv_data_ptrs = [b.data_ptr() for b in bufs]
        args.kv_data_lens = [b.nbytes for b in bufs]
        args.kv_item_lens = [b[0].nbytes * PAGE_SIZE for b in bufs]
        args.kv_layer_ids = [layer for _, layer, _, _ in self.kv] if self.family == "hybrid" else []
        args.prefill_start_layer = self.start
        args.prefill_end_layer = self.start + (self.layers // self.pp_size)
        args.num_draft_entries = 0
        if self.family != "mla":
            args.kv_head_num, args.total_kv_head_num = len(self.kv[0][3]), HEADS
        args.state_types, args.state_data_ptrs, args.state_data_lens, args.state_item_lens = [], [], [], []
        args.state_dim_per_tensor, args.state_slice_outer_counts, args.state_layer_ids = [], [], []
        args.state_conv_shard_groups = []
        if self.state:
            from sglang.srt.disaggregation.base.conn import StateType
            from sglang.srt.disaggregation.utils import append_state_component

            tensors = [t for _, _, t, _ in self.state]
            append_state_component(
                args,
                StateType.MAMBA,
                [t.data_ptr() for t in tensors],
                [t.nbytes for t in tensors],
                [t[0].nbytes for t in tensors],
                [t.shape[1] for t in tensors],
                [list(CONV_GROUPS) if b < 50 else None for b, _, _, _ in self.state],
                [1] * len(tensors),
                [layer for _, layer, _, _ in self.state],
            )

    def holds(self, dst: list[int], src: list[int]) -> list[str]:
        """KV buffers whose pages ``dst`` differ from prefill's pages ``src`` (decode holds every head)."""
        bad = []
        for buffer, layer, t, coords in self.kv:
            for d, s in zip(dst, src, strict=True):
                got = t[d * PAGE_SIZE : (d + 1) * PAGE_SIZE]
                want = value(buffer, range(s * PAGE_SIZE, (s + 1) * PAGE_SIZE), coords, t.shape[2])
                if not torch.equal(got, want):
                    bad.append(f"kv {buffer} layer {layer} page {d}")
                    break
        return bad

    def state_holds(self, dst: int, src: int) -> list[str]:
        """State tensors whose slot ``dst`` differs from prefill's slot ``src``."""
        return [
            f"state {buffer} layer {layer}"
            for buffer, layer, t, coords in self.state
            if not torch.equal(t[dst : dst + 1], value(buffer, [src], coords, t.shape[2]))
        ]

    def state_zero(self, slot: int) -> bool:
        """True when slot ``slot`` of every state tensor is still zero."""
        return all(bool((t[slot] == 0).all()) for _, _, t, _ in self.state)
