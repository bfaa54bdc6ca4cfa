"""From ``kvroom demo``'s options to what its processes run with.

:func:`model_of` picks the model preset (or None for opaque pages),
:func:`keys_dir` finds or makes the CURVE key pairs, and :func:`node_options`
turns the whole command line into the :class:`~kvroom.demo.node_options.NodeOptions`
every node is spawned with: a pool big enough for ``concurrency`` rooms of
``--max-pages`` (plus slack), event-driven loops (or the stepping loop with
short deadlines under ``--chaos``), and byte checks unless ``--no-verify``.
Options a caller's namespace lacks (the soak builds its own) take their
defaults.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile

from kvroom.demo.node_options import NodeOptions
from kvroom.demo.options import DEFAULT_MODEL
from kvroom.presets import Preset, get_preset
from kvroom.transport.auth import generate_keys

__all__ = ["model_of", "keys_dir", "node_options"]


def model_of(args: argparse.Namespace) -> Preset | None:
    """The model preset, or None for opaque pages (``--page-kib``, or a namespace without ``model``)."""
    if getattr(args, "page_kib", None) or not hasattr(args, "model"):
        return None
    return get_preset(args.model or DEFAULT_MODEL, getattr(args, "layers", None))


def keys_dir(args: argparse.Namespace) -> str | None:
    """Where the nodes' CURVE pairs are (made if missing); None with ``--no-keys``."""
    if getattr(args, "no_keys", False):
        return None
    folder = getattr(args, "keys", None)
    if folder is None:
        folder = tempfile.mkdtemp(prefix="kvroom-keys-")
        atexit.register(shutil.rmtree, folder, True)
    for name in ("prefill", "decode"):
        if not os.path.exists(os.path.join(folder, f"{name}.key_secret")):
            generate_keys(folder, name)
    return str(folder)


def node_options(args: argparse.Namespace, audit_log: str) -> NodeOptions:
    """The options every node of the run starts with."""
    chaos = args.chaos
    model = model_of(args)
    concurrency = args.concurrency
    return NodeOptions(
        layers=getattr(args, "layers", None) or 4,
        page_bytes=(getattr(args, "page_kib", None) or 16) << 10,
        model=model.name if model is not None else None,
        model_layers=model.model.layers if model is not None else None,
        pool_pages=max(512, concurrency * args.max_pages + 64),
        aux_slots=concurrency,  # a request row (aux, mamba state) for each room in flight
        chunk_pages=args.chunk_pages,
        concurrency=concurrency,
        audit_log=audit_log,
        host=args.host,
        port=args.port,
        deadlines=(4.0, 60.0, 2.0) if chaos else (30.0, 120.0, 30.0),
        heartbeat=(0.25, 3.0),
        stderr_path=audit_log + ".stderr",
        # chaos steps on a scheduler tick so faults land mid-transfer; otherwise event-driven
        chunk_interval=NodeOptions.chunk_interval if chaos else 0.0,
        metrics_interval=0.5 if getattr(args, "metrics_port", None) is not None else None,
        seed=args.seed,
        keys_dir=keys_dir(args),
        verify=getattr(args, "verify", True),
    )
