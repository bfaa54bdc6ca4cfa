"""Worker-side kvroom connectors in real processes, driven one call at a time.

Each process hosts one vLLM worker-side ``KVRoomConnector`` over vLLM-shaped CPU caches and is
stepped the way vLLM's model runner steps it: the test plays the scheduler and hands each step's
jobs (:class:`~kvroom.integrations.vllm.metadata.KVRoomMetadata`) to ``bind_connector_metadata``.
Children die with their parent; the fixtures kill and reap them after every test.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Any

from tests.ranks import Rank


def pattern(layer: int, page: int, shape: tuple[int, ...]) -> Any:
    """What prefill holds in (layer, page): unique per layer, page and element."""
    import torch

    numel = 1
    for n in shape:
        numel *= n
    return (torch.arange(numel, dtype=torch.float32) % 4093 + layer * 100_000 + page * 5000).view(shape)


class ConnectorServer:
    """What runs in a worker process: one connector at a time, stepped by an engine loop.

    The loop thread steps the connector every couple of milliseconds, as vLLM's engine keeps
    stepping while the connector has push work; jobs handed in by :meth:`submit` go into the
    next step.  :meth:`looping` stops and restarts it, so a test can hold a side still.
    """

    def __init__(self) -> None:
        self.connector: Any = None
        self.reported: dict[str, set[Any]] = {}
        self.lock = threading.Lock()
        self.jobs: list[Any] = []
        self.run = threading.Event()
        self.crash = ""
        threading.Thread(target=self._loop, name="engine-loop", daemon=True).start()

    def start(self, model: str, role: str, layout: str = "LBNHC", kv_heads: int = 2, **extra: Any) -> str:
        from vllm.v1.kv_cache_layout import KVCacheLayout

        from tests.integrations.vllm.harness import kv_caches, vllm_config, worker_connector

        self.stop()
        config = vllm_config(model, role, **extra)
        with self.lock:
            self.connector = worker_connector(config, kv_caches(KVCacheLayout[layout], kv_heads))
            pool = self.pool()
            if role == "kv_producer":
                for layer, tensor in enumerate(pool.layers):
                    for page in range(pool.num_pages):
                        tensor[page].copy_(pattern(layer, page, tuple(tensor[page].shape)))
            self.reported = {"sending": set(), "recving": set(), "failed": set(), "errors": set()}
        self.run.set()
        return str(self.connector.get_handshake_metadata().bootstrap_addr)

    def pool(self) -> Any:
        return self.connector.worker.manager.pool

    def stop(self) -> None:
        self.run.clear()
        with self.lock:
            if self.connector is not None:
                self.connector.shutdown()
            self.connector = None

    def looping(self, on: bool) -> None:
        """Start or stop stepping the connector (a stopped side still runs kvroom's own thread)."""
        if on:
            self.run.set()
        else:
            self.run.clear()
            with self.lock:  # a step in progress ends first
                pass

    def submit(
        self, sends: list[tuple[Any, ...]] = (), recvs: list[tuple[Any, ...]] = (), cancels: list[str] = ()
    ) -> None:
        """Jobs for the next step, as the scheduler side would ship them."""
        from kvroom.integrations.vllm.metadata import KVRoomMetadata, RecvJob, SendJob

        meta = KVRoomMetadata(
            sends=[SendJob(r, room, tuple(p)) for r, room, p in sends],
            recvs=[RecvJob(r, room, tuple(a), tuple(p), n) for r, room, a, p, n in recvs],
            cancels=list(cancels),
        )
        with self.lock:
            self.jobs.append(meta)
        if not self.run.is_set():  # a held side still takes its jobs, without polling rooms
            self._step(poll=False)

    def _loop(self) -> None:
        while True:
            if self.run.wait(0.05):
                try:
                    self._step(poll=True)
                except Exception:  # surfaced by the next wait(): a broken step must fail the test
                    self.crash = traceback.format_exc()
                    self.run.clear()
                time.sleep(0.002)

    def _step(self, poll: bool) -> None:
        """One engine step, as vLLM's model runner drives the connector."""
        from kvroom.integrations.vllm.metadata import KVRoomMetadata

        with self.lock:
            c = self.connector
            if c is None:
                return
            jobs, self.jobs = self.jobs, []
            meta = KVRoomMetadata()
            for j in jobs:
                meta.sends += j.sends
                meta.recvs += j.recvs
                meta.cancels += j.cancels
            c.bind_connector_metadata(meta)
            c.start_load_kv(None)
            c.wait_for_save()
            if not poll:
                c.clear_connector_metadata()
                return
            done = c.get_transfer_results(set())
            errors = c.get_block_ids_with_load_errors()
            c.clear_connector_metadata()
            got = {
                "sending": done.finished_sending,
                "recving": done.finished_recving,
                "failed": done.failed_recving,
                "errors": errors,
            }
            for key, values in got.items():
                self.reported[key] |= values

    def wait(self, req_ids: list[str], key: str, timeout: float) -> dict[str, list[Any]]:
        """Wait until every request was reported under ``key``; returns all reports so far."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.crash:
                raise RuntimeError(f"the engine loop crashed: {self.crash}")
            with self.lock:
                if set(req_ids) <= self.reported[key]:
                    break
            time.sleep(0.005)
        with self.lock:
            return {k: sorted(v) for k, v in self.reported.items()}

    def wait_state(self, req_id: str, state: str, timeout: float) -> str:
        """Wait until a request's room is in ``state`` (without stepping); returns its state."""
        end = time.monotonic() + timeout
        while True:
            with self.lock:
                room = self.connector.worker.rooms.get(req_id)
                got = "absent" if room is None else str(room.handle.poll().name)
            if got == state or time.monotonic() > end:
                return got
            time.sleep(0.005)

    def holds(self, dst: list[int], src: list[int]) -> bool:
        """True when pages ``dst`` hold prefill's pages ``src`` in every layer."""
        import torch

        pool = self.pool()
        return all(
            torch.equal(t[d], pattern(layer, s, tuple(t[d].shape)))
            for layer, t in enumerate(pool.layers)
            for d, s in zip(dst, src, strict=True)
        )

    def holds_heads(self, dst: list[int], src: list[int], total_heads: int) -> bool:
        """Tensor parallelism: pages ``dst`` hold this rank's heads of prefill's pages ``src``."""
        import torch

        pool = self.pool()
        lo, hi = pool.layout.heads
        for layer, t in enumerate(pool.layers):
            for d, s in zip(dst, src, strict=True):
                shape = (t.shape[1], total_heads, t.shape[3])
                if not torch.equal(t[d], pattern(layer, s, shape)[:, lo:hi]):
                    return False
        return True

    def zero(self, pages: list[int]) -> bool:
        """True when pages hold only zeros in every layer."""
        return all(not t[pages].any() for t in self.pool().layers)

    def held(self, req_ids: list[str], rooms: list[int]) -> list[str]:
        """Whatever the connector or kvroom still holds for these requests and rooms."""
        with self.lock:
            return self._held(req_ids, rooms)

    def _held(self, req_ids: list[str], rooms: list[int]) -> list[str]:
        worker = self.connector.worker
        found = [
            f"{r}: {worker.held(r, room)}"
            for r, room in zip(req_ids, rooms, strict=True)
            if worker.held(r, room)
        ]
        live = {k: v for k, v in worker.manager.snapshot()["rooms"].items() if v}
        return found + ([f"live rooms {live}"] if live else [])

    def failures(self) -> dict[str, int]:
        """Failures by cause since the connector started (its stats are not drained here)."""
        with self.lock:
            return dict(self.connector.worker.stats["failures"])

    def ended(self) -> dict[str, int]:
        """Rooms ended, by final state, since the connector started."""
        with self.lock:
            return dict(self.connector.worker.stats["ended"])

    def break_next_write(self) -> None:
        """The next NIXL transfer() fails to start with a real NIXL backend error."""
        from nixl._bindings import nixlBackendError

        agent = self.connector.worker.manager.agent._agent
        real = agent.transfer

        def failing(handle: Any) -> Any:
            agent.transfer = real
            raise nixlBackendError("injected: the WRITE failed to start")

        agent.transfer = failing


class Worker(Rank):
    """The test's end of one worker process (a :class:`~tests.ranks.Rank` serving a connector)."""

    def __init__(self, name: str, env: dict[str, str] | None = None) -> None:
        super().__init__(name, env, server=ConnectorServer)

    def call(self, method: str, *args: Any, timeout: float = 120.0, **kwargs: Any) -> Any:
        """Run ``method`` in the process (a connector step may take longer than a rank call)."""
        return super().call(method, *args, timeout=timeout, **kwargs)
