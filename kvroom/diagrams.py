"""State diagrams generated from the declaration in :mod:`kvroom.fsm.spec`.

``GraphMachine`` instances are built here only, never on the hot path (they
keep references to every model they see).  Mermaid needs nothing installed;
SVG uses pygraphviz, whose wheels bundle Graphviz.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvroom.fsm.spec import Role, build_machine

__all__ = ["render_mermaid", "render_svg", "expected_files", "write_diagrams", "stale_diagrams"]

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "diagrams"


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


def expected_files() -> dict[str, str]:
    """File name -> content for every diagram."""
    files = {}
    for role in Role:
        files[f"{role.value}.mmd"] = render_mermaid(role)
        files[f"{role.value}.svg"] = render_svg(role)
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
