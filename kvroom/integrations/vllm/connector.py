"""``KVRoomConnector``: kvroom as a vLLM v1 KV connector (push: prefill WRITEs into decode's blocks).

Enable it with ``KVTransferConfig(kv_connector="KVRoomConnector",
kv_connector_module_path="kvroom.integrations.vllm", kv_role="kv_producer")``
on prefill and ``kv_role="kv_consumer"`` on decode.  Options go in
``kv_connector_extra_config``:

* ``bootstrap_port`` (prefill; 0 picks a free port per worker): worker rank
  ``r`` listens on ``bootstrap_port + r``; ``bootstrap_host`` (default
  127.0.0.1) is the address kvroom binds and advertises;
* ``deadlines``: ``[bootstrapping, waiting_for_input, transferring]`` seconds
  (kvroom's :class:`~kvroom.Deadlines`), ``heartbeat_interval``,
  ``heartbeat_timeout``, ``transfer_mode``: kvroom's :class:`~kvroom.ManagerConfig`;
* ``audit`` (default True): kvroom's structlog audit events per transition;
* ``staging_pages`` (decode): kvroom's staging ring, needed when prefill runs another
  tensor-parallel size (or set ``transfer_mode="direct"``);
* ``tp_rank`` / ``tp_size``: override what vLLM's parallel state says (tests, custom launchers).

The scheduler side lives in :mod:`.scheduler`, the worker side in
:mod:`.worker`; this class only routes vLLM's calls to them.
"""

from __future__ import annotations

import os
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from kvroom import Deadlines, ManagerConfig
from kvroom.integrations.vllm.metadata import KVRoomHandshake, KVRoomMetadata
from kvroom.integrations.vllm.pool import pool_from_caches
from kvroom.integrations.vllm.scheduler import RoomScheduler
from kvroom.integrations.vllm.stats import KVRoomPromMetrics, KVRoomStats, new_data
from kvroom.integrations.vllm.worker import RoomWorker
from kvroom.transport.auth import AUTH_ENV, auth_settings

__all__ = ["KVRoomConnector", "manager_config"]


def manager_config(extra: dict[str, Any]) -> ManagerConfig:
    """kvroom's manager settings from ``kv_connector_extra_config``."""
    kwargs: dict[str, Any] = {}
    if "deadlines" in extra:
        kwargs["deadlines"] = Deadlines(*(float(s) for s in extra["deadlines"]))
    for key in ("heartbeat_interval", "heartbeat_timeout", "busy_poll_interval", "target_poll_interval"):
        if key in extra:
            kwargs[key] = float(extra[key])
    if "transfer_mode" in extra:
        kwargs["transfer_mode"] = str(extra["transfer_mode"])
    kwargs["host"] = str(extra.get("bootstrap_host", "127.0.0.1"))
    # authentication: key_file / trusted_keys / allow_unauthenticated in the extra config, else
    # the KVROOM_* environment variables; without keys only a loopback bootstrap_host starts
    auth = {name: extra.get(name, os.environ.get(var)) for name, var in AUTH_ENV.items()}
    kwargs.update(auth_settings(auth))
    return ManagerConfig(**kwargs)


def _tp_rank(extra: dict[str, Any]) -> int:
    if "tp_rank" in extra:
        return int(extra["tp_rank"])
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # no distributed group (a single-process worker): rank 0
        return 0


class KVRoomConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """A vLLM v1 KV connector whose every transfer is a kvroom room.

    Prefill (``kv_producer``) requests carry ``do_remote_decode`` and
    ``kvroom_room`` in ``kv_transfer_params``; their finished params carry the
    room and prefill's bootstrap addresses for decode (``kv_consumer``), whose
    requests carry ``do_remote_prefill`` with them.  See the package docstring.
    """

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        if transfer.is_kv_producer == transfer.is_kv_consumer:
            raise NotImplementedError("KVRoomConnector is kv_producer (prefill) or kv_consumer (decode)")
        self.producer = bool(transfer.is_kv_producer)
        extra: dict[str, Any] = dict(transfer.kv_connector_extra_config or {})
        self.block_size = int(vllm_config.cache_config.block_size)
        self.tp_size = int(extra.get("tp_size", vllm_config.parallel_config.tensor_parallel_size))
        self.scheduler: RoomScheduler | None = None
        self._held_reported = 0
        self.worker: RoomWorker | None = None
        port = int(extra.get("bootstrap_port", 0))
        if role == KVConnectorRole.SCHEDULER:
            host = str(extra.get("bootstrap_host", "127.0.0.1"))
            addrs = tuple(f"{host}:{port + r}" for r in range(self.tp_size)) if port else ()
            self.scheduler = RoomScheduler(self.producer, self.block_size, addrs)
        else:
            self.tp_rank = _tp_rank(extra)
            self.staging = int(extra.get("staging_pages", 0))
            self.worker = RoomWorker(
                self.producer,
                manager_config(extra),
                bootstrap_port=port,
                tp_rank=self.tp_rank,
                audit=bool(extra.get("audit", True)),
            )

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        """No: kvroom's NIXL registrations would point at the memory sleep mode remaps.

        vLLM 0.33 then refuses ``enable_sleep_mode`` with this connector at start-up, with a
        clear error, instead of moving KV through stale registrations (0.32 has no sleep hooks).
        """
        return False

    # -- worker side --------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        """Register vLLM's layer caches with kvroom (see :mod:`.pool`) and start its manager."""
        assert self.worker is not None
        pool = pool_from_caches(
            kv_caches, self.block_size, tp_rank=self.tp_rank, tp_size=self.tp_size, staging_pages=self.staging
        )
        if pool.layout.tp_size != self.tp_size:
            raise NotImplementedError(
                "tensor parallelism needs a token-major KV cache layout (VLLM_KV_CACHE_LAYOUT=LBNHC)"
            )
        self.worker.register(pool)

    def _take(self) -> None:
        if self.worker is not None and self.has_connector_metadata():
            meta = self._get_connector_metadata()
            if isinstance(meta, KVRoomMetadata):
                self.worker.take(meta)

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        """Take this step's jobs now, before the forward pass: rooms open (and push) while it runs.

        vLLM starts asynchronous loads only after the forward, so waiting for ``start_load_kv``
        would delay every room by a whole forward pass of other requests.
        """
        super().bind_connector_metadata(connector_metadata)
        self._take()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Open this step's rooms (loads are pushed by prefill; nothing to start here)."""
        self._take()

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: a request is scheduled only after its room succeeded."""

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        """Nothing per layer: prefill sends a request's blocks once it finished."""

    def wait_for_save(self) -> None:
        """Open this step's rooms if ``start_load_kv`` did not run."""
        self._take()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Rooms that ended: sends, receives, and failed receives (also in ``finished_recving``)."""
        if self.worker is None:
            return KVConnectorTransferResults()
        self._take()
        done = self.worker.results()
        return KVConnectorTransferResults(
            finished_sending=done.finished_sending,
            finished_recving=done.finished_recving,
            failed_recving=done.failed_recving,
        )

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """The pre-0.33 form of :meth:`get_transfer_results` (call one or the other)."""
        done = self.get_transfer_results(finished_req_ids)
        return done.finished_sending or None, done.finished_recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks of receives that failed since the last call (reported with the request)."""
        return set() if self.worker is None else self.worker.load_errors()

    def get_kv_connector_stats(self) -> KVRoomStats | None:
        """Worker: rooms ended, failures by cause, bytes and latency since the last call;
        scheduler: the requests it holds blocks for, when that number changed."""
        if self.worker is None:
            held = self._sched().held_count()
            if held == self._held_reported:
                return None
            self._held_reported = held
            return KVRoomStats({**new_data(), "held": held})
        stats = KVRoomStats(self.worker.take_stats())
        return None if stats.is_empty() else stats

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVRoomPromMetrics:
        """kvroom's figures on vLLM's ``/metrics`` (``vllm:kvroom_*``; see :mod:`.stats`)."""
        return KVRoomPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVRoomStats:
        """Rebuild stats from their payload (vLLM's logger process)."""
        return KVRoomStats(dict(data) if data else None)

    def get_handshake_metadata(self) -> KVRoomHandshake | None:
        """This worker's kvroom bootstrap address, collected by vLLM for the scheduler."""
        return None if self.worker is None else self.worker.handshake()

    def shutdown(self) -> None:
        """Abort open rooms and stop kvroom's manager."""
        if self.worker is not None:
            self.worker.close()

    # -- scheduler side -----------------------------------------------------------

    def _sched(self) -> RoomScheduler:
        assert self.scheduler is not None, "a scheduler-side call on a worker-side connector"
        return self.scheduler

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        """Learn the prefill workers' bootstrap addresses."""
        if self.scheduler is not None:
            self.scheduler.set_handshake(metadata)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Decode: the prompt past the local hit arrives asynchronously; prefill: nothing."""
        return self._sched().matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Decode: open the request's room into its newly allocated blocks."""
        self._sched().after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVRoomMetadata:
        """This step's rooms to open and receives to abort."""
        return self._sched().build_meta()

    def update_connector_output(self, connector_output: Any) -> None:
        """Forget rooms the workers reported terminal."""
        self._sched().update(connector_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Prefill: hold the blocks until the room is terminal; decode: abort an open room."""
        return self._sched().request_finished(request, block_ids)

    def has_pending_push_work(self) -> bool:
        """True while a room is open or a job is not yet shipped."""
        return self.scheduler is not None and self.scheduler.pending()
