"""Model layouts: which logical buffers a model has, and which part of each a rank holds.

A :class:`ModelLayout` lists the model's logical buffers (:class:`Buffer`),
identical on prefill and decode.  A buffer is a sequence of *items* indexed
in one *index space*: ``"kv"`` (the request's KV page list), ``"aux"`` (the
request's aux row) or a named state space (``"mamba"``: one row per request;
``"swa"``: sliding-window pages).  An item is ``rows`` rows; a row is one or
more :class:`Section` s; a section is ``heads`` heads of ``head_dim``
elements of ``dtype``.  So ``[pages, page_size, heads, head_dim]`` is
``rows=page_size`` and one section; MLA's latent is one section of 1 "head"
576 wide; a conv-state row concatenating q, k and v channels is three sections.

A :class:`RankLayout` is one rank's view: tensor-parallel rank ``tp_rank`` of
``tp_size`` holds, of each section, the heads :func:`tp_heads` gives it, and
pipeline stage ``pp_rank`` holds the layers ``[layer_start, layer_end)``.

*One rule covers MHA, GQA, replicated heads and MLA* (SGLang's): with ``H``
heads over ``T`` ranks, rank ``r`` holds ``H / T`` heads from ``r * H / T``
when ``H >= T``, else one replica of head ``r // (T / H)``.  MLA's latent
(``H = 1``) is therefore on every rank, and so is anything unsliced (aux rows).
State is sliced the way engines slice it: SGLang's mamba pools hold
``conv_state [layers, size+1, conv_dim/tp, kernel-1]`` and ``temporal_state
[layers, size+1, heads/tp, head_dim, state]`` and its heterogeneous-TP path
(``_send_mamba_state_slice``) cuts the TP-sharded dimension per segment, so a
state row is sections of heads (conv: the q, k, v channel segments; ssm: the
value heads); a state an engine replicates is a section with one head.  An
engine's one-tensor-for-all-layers state pool is one region per layer, each
a slice of it.  Buffers without a layer (aux rows, a draft model's
KV) are held by the last pipeline stage unless ``holds_aux`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvroom.errors import IncompatiblePeerError

__all__ = [
    "DTYPE_BYTES",
    "Buffer",
    "ModelLayout",
    "RankLayout",
    "Section",
    "pp_layers",
    "tp_heads",
]

DTYPE_BYTES: dict[str, int] = {
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint8": 1,
    "int8": 1,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "int32": 4,
    "int64": 8,
}
"""Bytes per element of the dtypes a buffer may hold (torch's names)."""


def tp_heads(total: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """The global heads ``[lo, hi)`` that TP rank ``tp_rank`` of ``tp_size`` holds of ``total``.

    ``total >= tp_size``: an equal slice (``total`` must divide evenly);
    ``total < tp_size``: one replica, head ``tp_rank // (tp_size // total)``.
    """
    if total >= tp_size:
        if total % tp_size:
            raise ValueError(f"{total} heads do not split over {tp_size} tensor-parallel ranks")
        n = total // tp_size
        return tp_rank * n, (tp_rank + 1) * n
    if tp_size % total:
        raise ValueError(f"{total} heads do not replicate evenly over {tp_size} tensor-parallel ranks")
    head = tp_rank // (tp_size // total)
    return head, head + 1


def pp_layers(layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """The layers ``[start, end)`` of stage ``pp_rank`` in an even split of ``layers``."""
    return pp_rank * layers // pp_size, (pp_rank + 1) * layers // pp_size


@dataclass(frozen=True)
class Section:
    """``heads`` heads (over the whole model) of ``head_dim`` elements, in one row."""

    heads: int
    head_dim: int


@dataclass(frozen=True)
class Buffer:
    """One logical buffer: items of ``rows`` rows of ``sections``, indexed in ``space``."""

    name: str
    layer: int | None
    space: str
    rows: int
    sections: tuple[Section, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"buffer {self.key!r}: unknown dtype {self.dtype!r}")
        if self.rows <= 0 or not self.sections:
            raise ValueError(f"buffer {self.key!r}: needs rows > 0 and at least one section")
        if any(s.heads <= 0 or s.head_dim <= 0 for s in self.sections):
            raise ValueError(f"buffer {self.key!r}: section sizes must be positive")

    @property
    def key(self) -> str:
        """The name of the region that holds this buffer: ``name.layer``, or ``name``."""
        return self.name if self.layer is None else f"{self.name}.{self.layer}"

    @property
    def role(self) -> str:
        """The region role: ``kv`` for the page list, ``aux``, or ``state``."""
        return self.space if self.space in ("kv", "aux") else "state"

    @property
    def elem_bytes(self) -> int:
        """Bytes per element."""
        return DTYPE_BYTES[self.dtype]

    @property
    def shape(self) -> tuple[int, tuple[tuple[int, int], ...]]:
        """``(rows, ((heads, head_dim), ...))``: what must agree between peers."""
        return self.rows, tuple((s.heads, s.head_dim) for s in self.sections)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the control plane."""
        return {
            "name": self.name,
            "layer": self.layer,
            "space": self.space,
            "rows": self.rows,
            "sections": [[s.heads, s.head_dim] for s in self.sections],
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Buffer:
        """Parse a peer's buffer; raises ValueError when malformed."""
        try:
            layer = data["layer"]
            return cls(
                name=str(data["name"]),
                layer=None if layer is None else int(layer),
                space=str(data["space"]),
                rows=int(data["rows"]),
                sections=tuple(Section(int(h), int(d)) for h, d in data["sections"]),
                dtype=str(data["dtype"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed buffer {data!r}: {exc}") from exc


@dataclass(frozen=True)
class ModelLayout:
    """The model's logical buffers; prefill and decode must describe the same model."""

    layers: int
    page_size: int
    buffers: tuple[Buffer, ...]
    by_key: dict[str, Buffer] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.layers <= 0 or self.page_size <= 0:
            raise ValueError(f"layers and page_size must be positive, got {self.layers}, {self.page_size}")
        keys: dict[str, Buffer] = {}
        for b in self.buffers:
            if b.key in keys:
                raise ValueError(f"buffer {b.key!r} is listed twice")
            if b.layer is not None and not 0 <= b.layer < self.layers:
                raise ValueError(f"buffer {b.key!r}: layer outside [0, {self.layers})")
            keys[b.key] = b
        object.__setattr__(self, "by_key", keys)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the control plane."""
        return {
            "layers": self.layers,
            "page_size": self.page_size,
            "buffers": [b.to_dict() for b in self.buffers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelLayout:
        """Parse a peer's model layout; raises ValueError when malformed."""
        try:
            buffers = tuple(Buffer.from_dict(b) for b in data["buffers"])
            return cls(int(data["layers"]), int(data["page_size"]), buffers)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed model layout: {exc}") from exc

    def check_compatible(self, peer: ModelLayout, peer_name: str) -> None:
        """Raise :class:`IncompatiblePeerError` naming each field that differs.

        Fields: ``layer count``, ``page_size``, ``buffers`` (present on one side
        only), and per buffer ``dtype``, ``index space``, then ``total heads``,
        ``head_dim`` and ``rows`` (KV buffers), ``state shapes`` (state
        buffers) or ``aux rows`` (aux buffers).
        """
        diffs: dict[str, list[str]] = {}

        def differ(what: str, key: str, mine: object, theirs: object) -> None:
            diffs.setdefault(what, []).append(f"{key}: ours {mine!r}, theirs {theirs!r}")

        if self.layers != peer.layers:
            differ("layer count", "layers", self.layers, peer.layers)
        if self.page_size != peer.page_size:
            differ("page_size", "model", self.page_size, peer.page_size)
        only_ours = sorted(set(self.by_key) - set(peer.by_key))
        only_theirs = sorted(set(peer.by_key) - set(self.by_key))
        if only_ours or only_theirs:
            differ("buffers", "present on one side", only_ours[:4], only_theirs[:4])
        for key, mine in self.by_key.items():
            theirs = peer.by_key.get(key)
            if theirs is None:
                continue
            if mine.dtype != theirs.dtype:
                differ("dtype", key, mine.dtype, theirs.dtype)
            if mine.space != theirs.space:
                differ("index space", key, mine.space, theirs.space)
            if mine.role != "kv":  # state rows and aux rows: their shape as a whole
                if mine.shape != theirs.shape:
                    differ(
                        "state shapes" if mine.role == "state" else "aux rows", key, mine.shape, theirs.shape
                    )
                continue
            if mine.rows != theirs.rows:
                differ("rows", key, mine.rows, theirs.rows)
            if len(mine.sections) != len(theirs.sections):
                differ("sections", key, len(mine.sections), len(theirs.sections))
                continue
            for a, b in zip(mine.sections, theirs.sections, strict=True):
                if a.heads != b.heads:
                    differ("total heads", key, a.heads, b.heads)
                if a.head_dim != b.head_dim:
                    differ("head_dim", key, a.head_dim, b.head_dim)
        if diffs:
            parts = [
                f"{what} ({items[0]}" + (f"; and {len(items) - 1} more)" if len(items) > 1 else ")")
                for what, items in diffs.items()
            ]
            raise IncompatiblePeerError(f"peer {peer_name} has an incompatible layout: {'; '.join(parts)}")


@dataclass(frozen=True)
class RankLayout:
    """One rank's share of a model: TP rank of TP size, PP stage and its layer range."""

    model: ModelLayout
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    layer_start: int | None = None
    layer_end: int | None = None
    holds_aux: bool | None = None
    """Whether this rank holds the buffers without a layer; default: the last stage does."""

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size or not 0 <= self.pp_rank < self.pp_size:
            tp, pp = f"{self.tp_rank} of {self.tp_size}", f"{self.pp_rank} of {self.pp_size}"
            raise ValueError(f"rank outside its group: tp {tp}, pp {pp}")
        start, end = pp_layers(self.model.layers, self.pp_rank, self.pp_size)
        if self.layer_start is None:
            object.__setattr__(self, "layer_start", start)
        if self.layer_end is None:
            object.__setattr__(self, "layer_end", end)
        if self.holds_aux is None:
            object.__setattr__(self, "holds_aux", self.pp_rank == self.pp_size - 1)
        lo, hi = self.layers
        if not 0 <= lo <= hi <= self.model.layers:
            raise ValueError(f"layer range [{lo}, {hi}) outside the model's {self.model.layers} layers")
        for b in self.model.buffers:
            for s in b.sections:
                tp_heads(s.heads, 0, self.tp_size)  # raises when the heads do not split

    @property
    def layers(self) -> tuple[int, int]:
        """The global layers ``[start, end)`` this stage holds."""
        assert self.layer_start is not None and self.layer_end is not None
        return self.layer_start, self.layer_end

    def holds(self, buffer: Buffer) -> bool:
        """Whether this rank holds (a slice of) ``buffer``."""
        if buffer.layer is None:
            return bool(self.holds_aux)
        return self.layers[0] <= buffer.layer < self.layers[1]

    def buffers(self) -> tuple[Buffer, ...]:
        """The buffers this rank holds, in model order."""
        return tuple(b for b in self.model.buffers if self.holds(b))

    def heads(self, section: Section) -> tuple[int, int]:
        """The global heads ``[lo, hi)`` of ``section`` this rank holds."""
        return tp_heads(section.heads, self.tp_rank, self.tp_size)

    def row_bytes(self, buffer: Buffer) -> int:
        """Bytes of one row of this rank's slice of ``buffer``."""
        return sum(self.section_bytes(buffer, i) for i in range(len(buffer.sections)))

    def section_bytes(self, buffer: Buffer, i: int) -> int:
        """Bytes of section ``i`` of one row of this rank's slice."""
        lo, hi = self.heads(buffer.sections[i])
        return (hi - lo) * buffer.sections[i].head_dim * buffer.elem_bytes

    def section_offset(self, buffer: Buffer, i: int) -> int:
        """Byte offset of section ``i`` inside one of this rank's rows."""
        return sum(self.section_bytes(buffer, j) for j in range(i))

    def item_bytes(self, buffer: Buffer) -> int:
        """Bytes of one item (page or row) of this rank's slice of ``buffer``."""
        return buffer.rows * self.row_bytes(buffer)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the control plane."""
        return {
            "model": self.model.to_dict(),
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
            "pp_rank": self.pp_rank,
            "pp_size": self.pp_size,
            "layer_start": self.layer_start,
            "layer_end": self.layer_end,
            "holds_aux": self.holds_aux,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RankLayout:
        """Parse a peer's rank layout; raises ValueError when malformed."""
        try:
            ints = {
                k: int(data[k])
                for k in ("tp_rank", "tp_size", "pp_rank", "pp_size", "layer_start", "layer_end")
            }
            return cls(ModelLayout.from_dict(data["model"]), holds_aux=bool(data["holds_aux"]), **ints)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed rank layout: {exc}") from exc
