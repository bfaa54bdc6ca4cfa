"""Prefill and decode *scheduler* processes driving kvroom's public API: their entry points.

:func:`prefill_main` and :func:`decode_main` run in a spawned child
(:class:`~kvroom.demo.cluster.Cluster` starts them): the process dies with its
parent, sends NIXL's own logs to ``stderr_path``, builds its pool
(:mod:`kvroom.demo.buffers`: a model preset's buffers or opaque pages, their
contents from patterns made once per process and stamped per room) and a
``KVManager`` over it with a :class:`~kvroom.demo.observer.WakeObserver`
(and the audit observer, and metrics), then runs its role's scheduler loop
(:mod:`kvroom.demo.loops`, over :mod:`kvroom.demo.scheduler`) until told to
stop.  The demo, the end-to-end tests and the soak all use these nodes.

Node -> parent, besides the loop's own messages: ``("ready", info)`` once the
manager listens, ``("final", summary)`` at the end (the manager's snapshot,
exceptions that escaped ``send()``/``poll()``, the last metrics), or
``("error", text)``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from kvroom.demo.buffers import DemoBuffers, make_buffers
from kvroom.demo.loops import DecodeLoop, PrefillLoop
from kvroom.demo.node_options import NodeOptions, RoomResult
from kvroom.demo.observer import WakeObserver

if TYPE_CHECKING:
    from kvroom.manager import KVManager
    from kvroom.observe.audit import BackgroundObserver
    from kvroom.observe.metrics import KVMetrics
    from kvroom.transport.auth import CurveKeys

__all__ = ["NodeOptions", "RoomResult", "prefill_main", "decode_main", "die_with_parent"]


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphans)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux
        pass
    if os.getppid() == 1:  # parent already gone
        os._exit(1)


def _make_manager(
    role: str, opts: NodeOptions, wake: WakeObserver, metrics: KVMetrics | None
) -> tuple[KVManager, DemoBuffers]:
    """The manager and the buffers behind its pool."""
    from kvroom import KVManager, ManagerConfig
    from kvroom.fsm import Deadlines

    layers = (opts.model_layers or 0) if opts.model else opts.layers
    buffers = make_buffers(
        opts.model, layers, opts.pool_pages, opts.aux_slots, opts.page_bytes, opts.aux_bytes, opts.seed
    )
    config = ManagerConfig(
        deadlines=Deadlines(*opts.deadlines),
        heartbeat_interval=opts.heartbeat[0],
        heartbeat_timeout=opts.heartbeat[1],
        host=opts.host,
        keys=_keys(role, opts.keys_dir),
    )
    import structlog

    quiet = structlog.wrap_logger(structlog.PrintLogger(open(os.devnull, "w")))  # noqa: SIM115
    manager = KVManager(
        role, buffers.pool, bootstrap_port=opts.port, config=config, observer=wake, audit=False, logger=quiet,
        metrics=metrics,
    )  # fmt: skip
    return manager, buffers


def _keys(role: str, keys_dir: str | None) -> CurveKeys | None:
    """This node's CURVE keys: its own pair, trusting only the other role's public key."""
    if keys_dir is None:
        return None
    from kvroom import CurveKeys

    other = "decode" if role == "prefill" else "prefill"
    return CurveKeys.load(
        os.path.join(keys_dir, f"{role}.key_secret"), [os.path.join(keys_dir, f"{other}.key")]
    )


def _audit(opts: NodeOptions) -> BackgroundObserver | None:
    """The audit observer writing ``opts.audit_log`` (None without one)."""
    if not opts.audit_log:
        return None
    from kvroom.observe.audit import AuditObserver, BackgroundObserver, json_lines_logger

    return BackgroundObserver(  # rendered on a writer thread, off the scheduler's
        AuditObserver(
            json_lines_logger(opts.audit_log), process=f"{opts.name}-{os.getpid()}", pid=os.getpid()
        )
    )


def _node(role: str, conn: Connection, opts: NodeOptions) -> None:
    die_with_parent()
    os.environ.update(opts.env)
    if opts.stderr_path:
        fd = os.open(opts.stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)  # NIXL logs to stdout: keep the demo's own output (and --json) clean
        os.dup2(fd, 2)
        os.close(fd)
    audit = _audit(opts)
    wake = WakeObserver(audit)
    metrics = None
    if opts.metrics_interval is not None:
        from kvroom.observe.metrics import KVMetrics

        metrics = KVMetrics()
    try:
        manager, buffers = _make_manager(role, opts, wake, metrics)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        wake.close()
        return
    try:
        conn.send(
            ("ready", {"addr": manager.bootstrap_addr, "pid": os.getpid(), "agent": manager.agent_name})
        )
        loop: PrefillLoop | DecodeLoop
        if role == "prefill":
            loop = PrefillLoop(manager, conn, opts, wake, buffers, metrics)
        else:
            loop = DecodeLoop(manager, conn, opts, wake, buffers, metrics)
        loop.run()
        if audit is not None:
            audit.flush()  # every record on disk before the parent may read the log
        final: dict[str, Any] = {"snapshot": manager.snapshot(), "unexpected": loop.unexpected}
        if metrics is not None:
            final["metrics"] = list(metrics.registry.collect())
        conn.send(("final", final))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        manager.close()
        wake.close()


def prefill_main(conn: Connection, opts: NodeOptions) -> None:
    """Entry point of a prefill node process."""
    _node("prefill", conn, opts)


def decode_main(conn: Connection, opts: NodeOptions) -> None:
    """Entry point of a decode node process."""
    _node("decode", conn, opts)
