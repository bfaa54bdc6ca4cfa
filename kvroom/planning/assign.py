"""Which source rank writes which heads of which buffer into one destination rank.

Both sides compute the assignment from the same layouts, so they agree on it
without saying more: prefill posts the WRITEs of its own entries, decode
counts on exactly the sources that have entries (the others only take part in
the room's verdict).

The rule, per destination buffer held, per section, per head the destination
holds: the *candidates* are the source ranks holding that buffer (its layer,
for pipeline stages) and that head; the destination's TP rank picks
``candidates[tp_rank % len(candidates)]``.  So

* head-sliced TP m -> n: each head has one candidate, its owner;
* replicated heads (fewer heads than TP ranks) and MLA (one latent "head" on
  every rank): decode ranks spread over the replicas, each head of each
  destination comes from exactly one source, and no byte is written twice;
  decode TP larger than prefill TP fans one source out to several ranks;
* pipeline stages: only the stage holding a layer is a candidate for it, so
  each stage writes its layers at their place in decode's layer list, decode
  PP 1 receives from every stage and equal PP maps stage to stage.

Consecutive heads with the same source merge into one :class:`Assignment`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from kvroom.errors import IncompatiblePeerError
from kvroom.planning.layout import ModelLayout, RankLayout, Section

__all__ = ["Assignment", "assign", "for_source", "group_ranks", "stage_entries", "writing_sources"]


@dataclass(frozen=True)
class Assignment:
    """Source ``source`` (an index into the sources list) writes ``heads`` of ``section`` of ``key``."""

    source: int
    key: str
    section: int
    heads: tuple[int, int]


def assign(destination: RankLayout, sources: Sequence[RankLayout]) -> tuple[Assignment, ...]:
    """Every buffer slice ``destination`` holds, each given to exactly one of ``sources``.

    ``sources`` are all ranks of the other side (TP x PP, in any order: the
    choice among replicas goes by (pp_rank, tp_rank), so both sides agree
    however they list them); each must describe the destination's model.  Raises
    :class:`~kvroom.errors.IncompatiblePeerError` when a model differs or no
    source holds some head or layer the destination needs.
    """
    for i, source in enumerate(sources):
        if source.model != destination.model:
            destination.model.check_compatible(source.model, f"source #{i}")
    out: list[Assignment] = []
    memo: dict[tuple[tuple[Section, ...], tuple[int, ...]], list[tuple[int, int, tuple[int, int]]]] = {}
    for buffer in destination.buffers():
        holders = tuple(i for i, s in enumerate(sources) if s.holds(buffer))
        if not holders:
            raise IncompatiblePeerError(
                f"no source rank holds {buffer.key!r} (layer {buffer.layer}) that the destination needs"
            )
        shares = memo.get((buffer.sections, holders))
        if shares is None:
            shares = _shares(destination, sources, buffer.sections, holders, buffer.key)
            memo[(buffer.sections, holders)] = shares
        out.extend(Assignment(src, buffer.key, sec, heads) for src, sec, heads in shares)
    return tuple(out)


def _shares(
    destination: RankLayout,
    sources: Sequence[RankLayout],
    sections: tuple[Section, ...],
    holders: tuple[int, ...],
    key: str,
) -> list[tuple[int, int, tuple[int, int]]]:
    shares: list[tuple[int, int, tuple[int, int]]] = []
    for k, section in enumerate(sections):
        # candidates in rank order, whatever order the caller listed the sources in
        ordered = sorted(holders, key=lambda i: (sources[i].pp_rank, sources[i].tp_rank, i))
        held = [(i, sources[i].heads(section)) for i in ordered]
        lo, hi = destination.heads(section)
        for head in range(lo, hi):
            candidates = [i for i, (a, b) in held if a <= head < b]
            if not candidates:
                raise IncompatiblePeerError(f"no source rank holds head {head} of {key!r} (section {k})")
            src = candidates[destination.tp_rank % len(candidates)]
            last = shares[-1] if shares else None
            if last is not None and last[:2] == (src, k) and last[2][1] == head:
                shares[-1] = (src, k, (last[2][0], head + 1))
            else:
                shares.append((src, k, (head, head + 1)))
    return shares


def stage_entries(destination: RankLayout, source: RankLayout) -> tuple[Assignment, ...]:
    """The entries ``source`` writes into ``destination``, knowing only ``source``'s own stage.

    What a prefill rank computes for a decode rank without the other stages'
    layer ranges: stages hold disjoint layers, so the candidates for a buffer
    ``source`` holds are exactly the TP ranks of its stage, and the entries
    equal those of :func:`assign` over every rank (``source`` at index 0 of
    the result's ``source`` field means ``source`` itself).  Raises
    :class:`~kvroom.errors.IncompatiblePeerError` when the models differ.
    """
    if source.model != destination.model:
        destination.model.check_compatible(source.model, "the peer")
    full = destination.model
    kept = tuple(b for b in full.buffers if source.holds(b) and destination.holds(b))
    model = ModelLayout(full.layers, full.page_size, kept)
    dst = replace(destination, model=model)
    stage = [replace(source, model=model, tp_rank=t) for t in range(source.tp_size)]
    mine = for_source(assign(dst, stage), source.tp_rank)
    return tuple(replace(a, source=0) for a in mine)


def for_source(assignments: Iterable[Assignment], source: int) -> tuple[Assignment, ...]:
    """The entries source ``source`` writes (empty: it only takes part in the verdict)."""
    return tuple(a for a in assignments if a.source == source)


def writing_sources(assignments: Iterable[Assignment]) -> frozenset[int]:
    """The sources that write anything into the destination."""
    return frozenset(a.source for a in assignments)


def group_ranks(
    model: ModelLayout,
    tp_size: int,
    pp_size: int = 1,
    layer_ranges: Sequence[tuple[int, int]] | None = None,
) -> list[RankLayout]:
    """Every rank of one side, stage-major: rank ``(pp, tp)`` is at ``pp * tp_size + tp``.

    What a side passes to :func:`assign` as ``sources`` (its own ranks, or a
    peer's from the peer's sizes).  ``layer_ranges`` gives each stage's
    ``[start, end)`` when the split is not the even one.
    """
    if layer_ranges is not None and len(layer_ranges) != pp_size:
        raise ValueError(f"{len(layer_ranges)} layer ranges for {pp_size} pipeline stages")
    out: list[RankLayout] = []
    for pp in range(pp_size):
        start, end = layer_ranges[pp] if layer_ranges is not None else (None, None)
        out.extend(RankLayout(model, tp, tp_size, pp, pp_size, start, end) for tp in range(tp_size))
    return out
