"""Named model presets shared by the tests, the benchmarks and ``kvroom demo --model NAME``.

Each preset is the KV layout of a model family that PD disaggregation is
deployed for, with the real per-layer geometry and fewer layers (so a CPU
machine holds a few ranks of it):

* ``llama3-8b``: GQA, 8 KV heads of 128, bf16, pages of 16 tokens, K and V in
  separate regions; 8 of 32 layers.
* ``deepseek-v3``: MLA, one 576-wide latent (kv_lora_rank 512 + rope 64) per
  token, identical on every TP rank, bf16, pages of 64 tokens; 8 of 61 layers.
* ``qwen3-next``: hybrid; every 4th layer full attention (GQA, 2 KV heads of
  256, pages of 16), the others gated-delta-net linear attention with one
  mamba state row per request per layer: a conv state (q, k and v channel
  sections, 16/16/32 heads of 128 channels x 3 kernel taps, bf16) and an ssm
  state (32 value heads of 128 x 128, float32), both sliced over TP as
  SGLang slices them; 8 of 48 layers.
* ``gpt-oss-20b``: alternating sliding-window and full attention (8 KV heads
  of 64, bf16, pages of 16); sliding-window layers index their own page list
  (the ``swa`` state space); 4 of 24 layers.

Every preset carries SGLang-like aux buffers of different row sizes.
:meth:`Preset.pool` builds a rank's regions over torch tensors;
:meth:`Preset.items` gives the item counts :func:`~kvroom.planning.synthetic_pool` takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvroom.planning.families import attention_buffers, aux_buffers, mamba_buffers
from kvroom.planning.layout import Buffer, ModelLayout, RankLayout, Section
from kvroom.transport.regions import RegionPool

if TYPE_CHECKING:
    import torch

__all__ = ["PRESETS", "Preset", "get_preset", "preset_names"]


def _aux(hidden: int) -> tuple[Buffer, ...]:
    """SGLang-like metadata rows: output ids, cached tokens, logprobs, top logprobs, hidden state."""
    return aux_buffers(
        {
            "output_ids": 64,
            "cached_tokens": 64,
            "output_logprobs": 64,
            "top_logprobs": 640,
            "hidden_states": hidden * 2,
        }
    )


@dataclass(frozen=True)
class Preset:
    """A named model layout and how to build a rank's pool for it."""

    name: str
    description: str
    model: ModelLayout

    def rank(self, tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0, pp_size: int = 1) -> RankLayout:
        """The layout of one rank (layers split evenly over pipeline stages)."""
        return RankLayout(self.model, tp_rank, tp_size, pp_rank, pp_size)

    def items(self, num_pages: int, num_requests: int) -> dict[str, int]:
        """Items per index space for a pool of ``num_pages`` pages and ``num_requests`` request rows."""
        return {"kv": num_pages, "swa": num_pages, "aux": num_requests, "mamba": num_requests}

    def tensors(
        self, rank: RankLayout, num_pages: int, num_requests: int, device: str = "cpu"
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Zeroed tensors for every buffer ``rank`` holds, by role then region name.

        A one-section buffer is ``[items, rows, local_heads, head_dim]``;
        one of several sections is ``[items, rows, row_elements]``.
        """
        import torch

        items = self.items(num_pages, num_requests)
        out: dict[str, dict[str, torch.Tensor]] = {"kv": {}, "aux": {}, "state": {}}
        for b in rank.buffers():
            dtype = getattr(torch, b.dtype)
            if len(b.sections) == 1:
                lo, hi = rank.heads(b.sections[0])
                shape: tuple[int, ...] = (items[b.space], b.rows, hi - lo, b.sections[0].head_dim)
            else:
                shape = (items[b.space], b.rows, rank.row_bytes(b) // b.elem_bytes)
            out[b.role][b.key] = torch.zeros(shape, dtype=dtype, device=device)
        return out

    def pool(
        self, rank: RankLayout, num_pages: int, num_requests: int, device: str = "cpu"
    ) -> tuple[RegionPool, dict[str, dict[str, torch.Tensor]]]:
        """The rank's regions over fresh tensors, and the tensors (keep them alive while registered)."""
        tensors = self.tensors(rank, num_pages, num_requests, device)
        return RegionPool.from_tensors(tensors["kv"], tensors["aux"], tensors["state"]), tensors


def _llama3_8b(layers: int = 8) -> Preset:
    buffers = attention_buffers(range(layers), 16, 8, 128, "bfloat16") + _aux(4096)
    return Preset(
        "llama3-8b", "GQA, 8 KV heads x 128, bf16, 16-token pages", ModelLayout(layers, 16, buffers)
    )


def _deepseek_v3(layers: int = 8) -> Preset:
    buffers = attention_buffers(range(layers), 64, 1, 512 + 64, "bfloat16", names=("kv",)) + _aux(7168)
    return Preset(
        "deepseek-v3", "MLA, 576-wide latent, bf16, 64-token pages", ModelLayout(layers, 64, buffers)
    )


def _qwen3_next(layers: int = 8) -> Preset:
    full = [x for x in range(layers) if x % 4 == 3]
    linear = [x for x in range(layers) if x % 4 != 3]
    taps = 128 * 3  # a head is 128 channels, each with conv_kernel - 1 = 3 taps, channel-major
    conv = (Section(16, taps), Section(16, taps), Section(32, taps))  # q, k, v channels
    state = mamba_buffers(linear, conv, (Section(32, 128 * 128),))
    buffers = attention_buffers(full, 16, 2, 256, "bfloat16") + state + _aux(2048)
    description = "hybrid: GQA every 4th layer, mamba conv + ssm state rows per request"
    return Preset("qwen3-next", description, ModelLayout(layers, 16, buffers))


def _gpt_oss_20b(layers: int = 4) -> Preset:
    full = attention_buffers([x for x in range(layers) if x % 2], 16, 8, 64, "bfloat16")
    window = [x for x in range(layers) if not x % 2]
    sliding = attention_buffers(window, 16, 8, 64, "bfloat16", names=("swa_k", "swa_v"), space="swa")
    description = "alternating sliding-window (own page list) and full attention, 8 KV heads x 64"
    return Preset("gpt-oss-20b", description, ModelLayout(layers, 16, full + sliding + _aux(2880)))


_BUILDERS = {
    "llama3-8b": _llama3_8b,
    "deepseek-v3": _deepseek_v3,
    "qwen3-next": _qwen3_next,
    "gpt-oss-20b": _gpt_oss_20b,
}

PRESETS: dict[str, Preset] = {name: build() for name, build in _BUILDERS.items()}
"""The presets by name, at their default (scaled-down) layer counts."""


def preset_names() -> list[str]:
    """The preset names, for ``--model`` choices."""
    return list(PRESETS)


def get_preset(name: str, layers: int | None = None) -> Preset:
    """The preset called ``name``, with ``layers`` layers if given; ValueError listing the choices."""
    build = _BUILDERS.get(name)
    if build is None:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    if layers is None:
        return PRESETS[name]
    if layers <= 0:
        raise ValueError(f"layers must be positive, got {layers}")
    return build(layers)
