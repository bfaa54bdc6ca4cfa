"""``kvroom demo``: real prefill and decode processes moving KV pages."""

from __future__ import annotations

import argparse

__all__ = ["run_demo"]


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo described by ``args``; returns the exit status."""
    from kvroom.demo.run import run

    return run(args)
