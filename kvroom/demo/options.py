"""Command-line options of ``kvroom demo`` (kept import-light)."""

from __future__ import annotations

import argparse

__all__ = ["DEFAULT_MODEL", "add_demo_arguments"]

DEFAULT_MODEL = "llama3-8b"


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``p``."""
    from kvroom.presets import PRESETS

    p.add_argument("--requests", type=_positive, default=300, help="number of requests (default 300)")
    p.add_argument("--decodes", type=_positive, default=2, help="decode processes (default 2)")
    p.add_argument(
        "--model",
        choices=list(PRESETS),
        default=DEFAULT_MODEL,
        help=f"model preset whose KV, aux and state buffers are moved (default {DEFAULT_MODEL}): "
        + "; ".join(f"{p.name}: {p.description}, {p.model.layers} layers" for p in PRESETS.values()),
    )
    p.add_argument(
        "--layers", type=_positive, default=None, help="model layers to move (default: the preset's)"
    )
    p.add_argument(
        "--page-kib",
        type=_positive,
        default=None,
        help="opaque pages of N KiB in --layers tensors (default 4) instead of a --model preset",
    )
    p.add_argument("--min-pages", type=_positive, default=1, help="fewest pages per request")
    p.add_argument("--max-pages", type=_positive, default=64, help="most pages per request (default 64)")
    p.add_argument("--chunk-pages", type=_positive, default=16, help="pages per send() chunk (default 16)")
    p.add_argument(
        "--concurrency", type=_positive, default=16, help="rooms in flight in the whole cluster (default 16)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--chaos", action="store_true", help="inject faults: kills, restarts, stops, aborts")
    p.add_argument(
        "--no-raw", dest="raw", action="store_false", help="skip the raw NIXL comparison after the rooms"
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="check no bytes: prefill stamps nothing, decode checks nothing (kvroom's run and the raw "
        "loop with equal work alike)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics on port N (0: any)",
    )
    p.add_argument(
        "--metrics-linger",
        type=float,
        default=5.0,
        help="seconds to keep serving /metrics after the summary (default 5)",
    )
    p.add_argument("--audit-log", help="where to write the JSON-lines audit log")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument(
        "--keys",
        metavar="DIR",
        help="CURVE key pairs 'prefill' and 'decode' (`kvroom keys DIR --name prefill`, then "
        "--name decode; missing pairs are made); default: fresh pairs in a temporary directory",
    )
    p.add_argument(
        "--no-keys", action="store_true", help="run the control plane unauthenticated (loopback only)"
    )
    p.add_argument("--port", type=int, default=0, help="prefill bootstrap port (default: a free one)")
    p.add_argument("--timeout", type=float, default=240.0, help="give up after this many seconds")
