"""Diagrams generated from the declarations: the room machines of :mod:`kvroom.fsm.spec`
and the two-sided protocol of :mod:`kvroom.protocol.spec`.

``GraphMachine`` instances are built here only, never on the hot path (they
keep references to every model they see).  Mermaid needs nothing installed;
SVG uses pygraphviz, whose wheels bundle Graphviz.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvroom.fsm.spec import Role, build_machine
from kvroom.protocol.spec import (
    DECODE_TABLE,
    MESSAGES,
    PREFILL_TABLE,
    RESULT_PHASE,
    SEQUENCE,
    Input,
    Msg,
    Reaction,
)

__all__ = [
    "render_mermaid",
    "render_svg",
    "render_protocol",
    "render_sequence",
    "expected_files",
    "write_diagrams",
    "stale_diagrams",
]

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "diagrams"


def _graph(role: Role, engine: str) -> object:
    from transitions.extensions.diagrams import GraphMachine

    machine = build_machine(
        role, GraphMachine, graph_engine=engine, show_conditions=True, title=f"kvroom {role.value}"
    )
    return machine.graph_cls(machine).get_graph()


def render_mermaid(role: Role) -> str:
    """The Mermaid ``stateDiagram-v2`` text of one role's machine."""
    text: str = _graph(role, "mermaid").draw(None)  # type: ignore[attr-defined]
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def render_svg(role: Role) -> str:
    """The SVG drawing of one role's machine (needs the ``diagrams`` extra)."""
    try:
        import pygraphviz  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("SVG diagrams need pygraphviz: pip install 'kvroom[diagrams]'") from exc
    os.environ.setdefault("FONTCONFIG_FILE", "/dev/null")  # quiet, font-independent output
    data: bytes = _graph(role, "pygraphviz").draw(None, format="svg", prog="dot")  # type: ignore[attr-defined]
    return data.decode()


def render_protocol(side: str) -> str:
    """Mermaid ``stateDiagram-v2`` of one side's protocol phases (``"decode"`` or ``"prefill"``).

    Every table entry is an edge ``phase --> result: input (sender) / reaction``;
    entries that change nothing are listed as notes on their phase.
    """
    rows: list[tuple[str, str, str, Reaction]] = []
    if side == "decode":
        for (phase, inp, sender), reaction in DECODE_TABLE.items():
            rows.append((phase.value, inp.value, sender.value, reaction))
    elif side == "prefill":
        for (pphase, inp, coordinator), reaction in PREFILL_TABLE.items():
            who = "rank 0" if coordinator else "rank k"
            rows.append((pphase.value, inp.value, who, reaction))
    else:
        raise ValueError(f"side must be 'decode' or 'prefill', got {side!r}")
    edges: dict[tuple[str, str], list[str]] = {}
    for source, what, who, reaction in rows:
        dest = RESULT_PHASE.get(reaction, source)
        if side == "prefill" and what == Input.DELIVERED.value:
            dest = "Delivered"
        label = f"{what} ({who}) / {reaction.value}"
        edges.setdefault((source, dest), []).append(label)
    lines = ["stateDiagram-v2", f"    %% kvroom {side} protocol, generated from kvroom/protocol/spec.py"]
    for (src, dst), labels in edges.items():
        for label in labels:
            lines.append(f"    {src} --> {dst}: {label}")
    return "\n".join(lines) + "\n"


def render_sequence() -> str:
    """Mermaid ``sequenceDiagram`` of one successful room, from the protocol declaration."""
    lines = [
        "sequenceDiagram",
        "    %% generated from kvroom/protocol/spec.py (SEQUENCE, MESSAGES)",
        "    participant decode as decode rank j",
        "    participant prefill0 as prefill rank 0 (coordinator)",
        "    participant prefillk as prefill rank k",
    ]
    for src, dst, msg, note in SEQUENCE:
        if msg is Msg.COMMIT and src == "prefill0":
            lines.append("    prefill0-->>decode: NIXL WRITEs (pages, aux)")
            lines.append(f"    prefill0->>decode: WRITTEN ({MESSAGES[Msg.WRITTEN][2]})")
            lines.append("    prefillk-->>decode: NIXL WRITEs (its heads)")
            lines.append("    prefillk->>decode: WRITTEN")
            lines.append(f"    decode->>prefill0: READY ({MESSAGES[Msg.READY][2]})")
        lines.append(f"    {src}->>{dst}: {msg.name}")
        if note:
            lines.append(f"    Note over {src},{dst}: {note}")
    lines.append("    Note over decode: Success only on COMMIT; Failed only once no WRITE can land")
    lines.append(
        "    Note over decode,prefill0: one rank on each side: no READY and no COMMIT; "
        "the room's last WRITTEN, marked commit, is the commit"
    )
    return "\n".join(lines) + "\n"


def expected_files() -> dict[str, str]:
    """File name -> content for every diagram."""
    files = {}
    for role in Role:
        files[f"{role.value}.mmd"] = render_mermaid(role)
        files[f"{role.value}.svg"] = render_svg(role)
    for side in ("prefill", "decode"):
        files[f"protocol-{side}.mmd"] = render_protocol(side)
    files["protocol-sequence.mmd"] = render_sequence()
    return files


def write_diagrams(out_dir: Path = DEFAULT_DIR) -> list[Path]:
    """Write every diagram into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in expected_files().items():
        path = out_dir / name
        path.write_text(content)
        written.append(path)
    return written


def stale_diagrams(out_dir: Path = DEFAULT_DIR) -> list[str]:
    """Names of diagram files in ``out_dir`` that are missing or out of date."""
    stale = []
    for name, content in expected_files().items():
        path = out_dir / name
        if not path.is_file() or path.read_text() != content:
            stale.append(name)
    return stale
