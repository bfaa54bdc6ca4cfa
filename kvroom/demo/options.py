"""Command-line options of ``kvroom demo`` (kept import-light)."""

from __future__ import annotations

import argparse

__all__ = ["add_demo_arguments"]


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``p``."""
    from kvroom.presets import preset_names  # no torch, no NIXL

    p.add_argument("--requests", type=_positive, default=300, help="number of requests (default 300)")
    p.add_argument("--decodes", type=_positive, default=2, help="decode processes (default 2)")
    p.add_argument("--min-pages", type=_positive, default=1, help="fewest pages per request")
    p.add_argument("--max-pages", type=_positive, default=32, help="most pages per request")
    p.add_argument("--chunk-pages", type=_positive, default=8, help="pages per send() chunk")
    p.add_argument("--page-kib", type=_positive, default=16, help="bytes per page per layer, in KiB")
    p.add_argument("--layers", type=_positive, default=4, help="KV layers")
    p.add_argument(
        "--model",
        choices=preset_names(),
        help="move a model preset's buffers (pages, aux rows, state rows) instead of opaque pages",
    )
    p.add_argument("--concurrency", type=_positive, default=32, help="rooms in flight per decode")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--chaos", action="store_true", help="inject faults: kills, restarts, stops, aborts")
    p.add_argument("--audit-log", help="where to write the JSON-lines audit log")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=0, help="prefill bootstrap port (default: a free one)")
    p.add_argument("--timeout", type=float, default=240.0, help="give up after this many seconds")
