"""Model-shaped KV for the demo: a small table of presets.

Each preset is a real model's KV geometry per layer (KV heads, head dim,
dtype) with a page size, and a layer count scaled down so a demo run fits this
machine's memory; ``kvroom demo --layers N`` overrides the count.  K and V of
a layer are two pool tensors, each ``[pages, page_size, kv_heads, head_dim]``.

Kept as plain data (name -> :class:`ModelShape`) so a shared presets module
can replace :data:`MODELS` without touching the demo.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["ModelShape", "MODELS", "DEFAULT_MODEL", "model_shape"]


@dataclass(frozen=True)
class ModelShape:
    """KV geometry of a model: ``layers`` (each a K and a V tensor), tokens per page, heads, dtype."""

    name: str
    layers: int
    page_size: int
    kv_heads: int
    head_dim: int
    dtype: str
    note: str = ""

    @property
    def tensors(self) -> int:
        """Pool tensors: K and V of every layer."""
        return 2 * self.layers

    @property
    def elem_bytes(self) -> int:
        """Bytes of one element of ``dtype``."""
        return int(torch.empty(0, dtype=getattr(torch, self.dtype)).element_size())

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of one tensor (K or V of one layer)."""
        return self.page_size * self.kv_heads * self.head_dim * self.elem_bytes

    @property
    def token_bytes(self) -> int:
        """KV bytes of one token over every layer, K and V."""
        return self.tensors * self.kv_heads * self.head_dim * self.elem_bytes


MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("llama3-8b-gqa", 4, 16, 8, 128, "bfloat16", "Llama 3 8B, 4 of 32 layers"),
        ModelShape("qwen2.5-7b-gqa", 4, 16, 4, 128, "bfloat16", "Qwen2.5 7B, 4 of 28 layers"),
        ModelShape("mistral-7b-gqa", 4, 16, 8, 128, "float16", "Mistral 7B, 4 of 32 layers"),
        ModelShape("tiny", 2, 16, 2, 64, "float16", "a toy shape"),
    )
}  # fmt: skip

DEFAULT_MODEL = "llama3-8b-gqa"


def model_shape(name: str, layers: int | None = None) -> ModelShape:
    """The preset ``name``, with ``layers`` layers when given (KeyError names the choices)."""
    try:
        shape = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
    return replace(shape, layers=layers) if layers else shape
