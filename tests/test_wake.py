"""WakeQueue: an item put by another thread is never slept through, with one wake-up byte a burst."""

from __future__ import annotations

import os
import select
from collections.abc import Iterator

import pytest

from kvroom.node import wake as wake_module
from kvroom.node.wake import WakeQueue


@pytest.fixture
def queue() -> Iterator[WakeQueue[int]]:
    q: WakeQueue[int] = WakeQueue()
    yield q
    q.close()


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_a_burst_of_puts_writes_one_wake_up_byte(queue: WakeQueue[int]) -> None:
    for i in range(100):
        queue.put(i)
    assert os.read(queue.fd, 4096) == b"x"
    assert queue.take() == list(range(100))
    assert not _readable(queue.fd)
    queue.put(100)
    assert _readable(queue.fd), "take() re-arms the wake-up"


def test_wake_writes_even_while_a_wake_up_is_pending(queue: WakeQueue[int]) -> None:
    queue.put(1)
    queue.wake()
    assert os.read(queue.fd, 4096) == b"xx"


@pytest.mark.parametrize("at_read", [1, 2])
@pytest.mark.parametrize("pending_before", [0, 1, 3])
def test_a_put_while_the_sleeper_drains_the_pipe_is_never_slept_through(
    monkeypatch: pytest.MonkeyPatch, queue: WakeQueue[int], at_read: int, pending_before: int
) -> None:
    """Another thread may ``put`` while the sleeper is inside ``take()``.

    ``os.read`` lets go of the GIL, so the putting thread can run in the middle
    of the drain: its ``put`` is simulated at the ``at_read``-th read.  After
    that, every item must be taken or leave a byte in the pipe, and a later
    ``put`` must wake the sleeper.  (Clearing the flag before draining failed
    here: kvroom's demo hung with finished rooms pending, and the manager's
    worker fell back on its 5 ms poll for every later command.)
    """
    real_read, reads = os.read, []

    def read(fd: int, n: int) -> bytes:
        reads.append(fd)
        if len(reads) == at_read:
            queue.put(100)  # the other thread, between the sleeper's steps
        return real_read(fd, n)

    for i in range(pending_before):
        queue.put(i)
    monkeypatch.setattr(wake_module.os, "read", read)
    taken = queue.take()
    monkeypatch.setattr(wake_module.os, "read", real_read)
    fired = len(reads) >= at_read
    assert _readable(queue.fd) or not queue.items, "items pending and no byte: the sleeper never wakes"
    if _readable(queue.fd):
        taken += queue.take()
    queue.put(200)
    assert _readable(queue.fd), "a put after take() left no wake-up byte: the sleeper sleeps through it"
    taken += queue.take()
    assert sorted(taken) == [*range(pending_before), *([100] if fired else []), 200]
