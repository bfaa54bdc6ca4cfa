"""Buffer lists for the model families engines run: attention pages, MLA latents, mamba state, aux rows.

Shorthands over :class:`~kvroom.planning.layout.Buffer`; any other shape
can be listed by hand.  Buffer keys follow SGLang's pointer order: all K
layers, then all V layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from kvroom.planning.layout import Buffer, Section

__all__ = ["attention_buffers", "aux_buffers", "draft_buffers", "mamba_buffers"]


def attention_buffers(
    layers: Iterable[int],
    page_size: int,
    heads: int,
    head_dim: int,
    dtype: str,
    names: tuple[str, ...] = ("k", "v"),
    space: str = "kv",
) -> tuple[Buffer, ...]:
    """Paged ``[pages, page_size, heads, head_dim]`` buffers, one per name per layer.

    ``names=("k", "v")`` is MHA/GQA with K and V in separate regions;
    ``names=("kv",)`` with ``heads=1`` and ``head_dim=kv_lora_rank + rope_dim``
    is MLA's latent; ``space="swa"`` makes sliding-window pages.
    """
    section = (Section(heads, head_dim),)
    return tuple(Buffer(n, layer, space, page_size, section, dtype) for n in names for layer in layers)


def aux_buffers(row_bytes: Mapping[str, int]) -> tuple[Buffer, ...]:
    """Aux buffers: one unsliced row of ``row_bytes[name]`` bytes per request each."""
    return tuple(Buffer(n, None, "aux", 1, (Section(1, b),), "uint8") for n, b in row_bytes.items())


def mamba_buffers(
    layers: Iterable[int],
    conv: tuple[Section, ...],
    ssm: tuple[Section, ...],
    conv_dtype: str = "bfloat16",
    ssm_dtype: str = "float32",
    space: str = "mamba",
) -> tuple[Buffer, ...]:
    """One conv-state and one ssm-state row per request per linear-attention layer.

    ``conv`` sections are the channel groups each TP rank slices separately
    (q, k and v for gated delta nets; a head is its channels x kernel taps);
    ``ssm`` sections are the state heads.  Keys are ``conv.L`` and ``ssm.L``.
    """
    layers = list(layers)
    return tuple(Buffer("conv", x, space, 1, conv, conv_dtype) for x in layers) + tuple(
        Buffer("ssm", x, space, 1, ssm, ssm_dtype) for x in layers
    )


def draft_buffers(
    layers: int, page_size: int, heads: int, head_dim: int, dtype: str, names: tuple[str, ...] = ("k", "v")
) -> tuple[Buffer, ...]:
    """A speculative-decoding draft model's paged KV, indexed by the request's page list.

    The draft's layers are not the target model's, so its buffers carry no
    model layer: keys are ``draft_k.0`` .. and, like aux rows, they are held
    by the last pipeline stage.  Their item sizes differ from the target's.
    """
    section = (Section(heads, head_dim),)
    return tuple(
        Buffer(f"draft_{n}.{i}", None, "kv", page_size, section, dtype) for n in names for i in range(layers)
    )
