"""Audit events: the structlog adapter for the core's observer interface.

kvroom never calls ``structlog.configure()``.  It asks for a logger, binds its
context once (``role``, ``process``) and emits one event per room creation
(``room.created`` with room, role, peer, time), one per transition
(``room.transition`` with room, role, peer, src, dst, trigger, reason, time;
the state-machine event is under ``trigger`` because structlog reserves
``event`` for the event name) and per cleanup (``room.cleanup``).  Applications route
those events like any other structlog output; :func:`json_lines_logger` gives
a ready JSON-lines file logger for tools and the demo.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable
from typing import Any, TextIO

import structlog

from kvroom.fsm.observer import CleanupRecord, CreatedRecord, IgnoredRecord, Observer, TransitionRecord

__all__ = [
    "AuditObserver",
    "BackgroundObserver",
    "json_lines_logger",
    "CREATED_EVENT",
    "TRANSITION_EVENT",
    "CLEANUP_EVENT",
    "IGNORED_EVENT",
]

CREATED_EVENT = "room.created"
TRANSITION_EVENT = "room.transition"
CLEANUP_EVENT = "room.cleanup"
IGNORED_EVENT = "room.ignored"


class AuditObserver:
    """Turns state-machine records into structlog events.

    ``logger`` defaults to ``structlog.get_logger("kvroom.audit")``; ``context``
    is bound once (``role`` and ``process`` are usual).  Ignored events are
    logged at debug level only when ``log_ignored`` is set.
    """

    def __init__(self, logger: Any = None, *, log_ignored: bool = False, **context: Any) -> None:
        base = logger if logger is not None else structlog.get_logger("kvroom.audit")
        self._log = base.bind(**context)
        self._log_ignored = log_ignored

    def on_create(self, record: CreatedRecord) -> None:
        """Emit ``room.created``."""
        self._log.info(
            CREATED_EVENT, room=record.room, role=record.role.value, peer=record.peer, time=record.time
        )

    def on_transition(self, record: TransitionRecord) -> None:
        """Emit ``room.transition``."""
        self._log.info(
            TRANSITION_EVENT,
            room=record.room,
            role=record.role.value,
            peer=record.peer,
            src=record.src.name,
            dst=record.dst.name,
            trigger=record.event.value,
            reason=record.reason,
            time=record.time,
        )

    def on_cleanup(self, record: CleanupRecord) -> None:
        """Emit ``room.cleanup`` naming the stores that held state."""
        self._log.info(
            CLEANUP_EVENT,
            room=record.room,
            role=record.role.value,
            state=record.state.name,
            stores=list(record.stores),
            time=record.time,
        )

    def on_ignored(self, record: IgnoredRecord) -> None:
        """Emit ``room.ignored`` at debug level when asked to."""
        if self._log_ignored:
            self._log.debug(
                IGNORED_EVENT,
                room=record.room,
                role=record.role.value,
                state=record.state.name if record.state is not None else None,
                trigger=record.event.value,
                time=record.time,
            )


_Record = CreatedRecord | TransitionRecord | CleanupRecord | IgnoredRecord


class BackgroundObserver:
    """Hands records to ``inner`` on a writer thread, off the scheduler's thread.

    The calling thread only appends the (already built) record to a queue; its
    ``on_*`` methods *are* the queue's C-level ``append``, with no Python frame.
    Rendering and writing happen on a daemon thread, in order, every
    ``interval`` seconds.  :meth:`flush` delivers everything queued so far;
    :meth:`close` flushes and stops the thread.  A record is never dropped; a
    failing ``inner`` loses nothing else (its first error is re-raised by the
    next :meth:`flush`).  Records still queued when the process is killed are
    lost with it, so tools reading the log must allow for a killed process.
    """

    def __init__(self, inner: Observer, *, interval: float = 0.05) -> None:
        self.inner = inner
        self._queue: collections.deque[_Record] = collections.deque()
        self.on_create: Callable[[CreatedRecord], None] = self._queue.append
        self.on_transition: Callable[[TransitionRecord], None] = self._queue.append
        self.on_cleanup: Callable[[CleanupRecord], None] = self._queue.append
        self.on_ignored: Callable[[IgnoredRecord], None] = self._queue.append
        self._interval = interval
        self._wake = threading.Event()
        self._stop = False
        self._lock = threading.Lock()  # one drainer at a time keeps records in order
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvroom-audit", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        inner, queue = self.inner, self._queue
        with self._lock:
            while queue:
                record = queue.popleft()
                try:
                    if isinstance(record, TransitionRecord):
                        inner.on_transition(record)
                    elif isinstance(record, CleanupRecord):
                        inner.on_cleanup(record)
                    elif isinstance(record, CreatedRecord):
                        on_create = getattr(inner, "on_create", None)
                        if on_create is not None:
                            on_create(record)
                    else:
                        inner.on_ignored(record)
                except Exception as exc:  # keep draining; report on flush
                    self._error = self._error or exc

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self._interval)
            self._drain()

    def flush(self) -> None:
        """Deliver every record queued so far (raises the inner observer's first error)."""
        self._drain()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Flush and stop the writer thread (idempotent)."""
        self._stop = True
        self._wake.set()
        self._thread.join(5)
        self.flush()


def json_lines_logger(path: str | os.PathLike[str] | TextIO) -> Any:
    """A structlog logger writing one JSON object per line to ``path``.

    The file is opened in append mode, so several processes can share one
    audit log (each line is a single ``write``).  Nothing global is configured.
    """
    if isinstance(path, (str, os.PathLike)):
        stream: TextIO = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the logger
    else:
        stream = path
    return structlog.wrap_logger(
        structlog.WriteLogger(stream),
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer(sort_keys=True)],
        wrapper_class=structlog.BoundLogger,
    )
