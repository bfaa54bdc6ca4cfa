"""``KvroomKVManager``: SGLang's ``BaseKVManager`` over one kvroom :class:`~kvroom.KVManager`.

Built from the ``KVArgs`` SGLang's ``_init_kv_manager`` fills: KV, metadata
(aux) and state buffers become kvroom raw regions bound to this rank's share
of the model (:func:`~kvroom.integrations.sglang.regions.regions_from_kv_args`:
MHA with replicated heads, MLA, hybrid mamba/SWA state, pipeline stages, host
or device memory).  Only ``KVROOM_STAGING_PAGES`` (set on both sides) builds
kvroom's tensor pool instead, the one kind with a staging ring
(:func:`~kvroom.integrations.sglang.staging.pool_from_kv_args`).  The model's
layer count and KV heads come from ``KVArgs`` and, where it lacks them, SGLang's
``ModelConfig``.
Prefill ranks register their kvroom control-plane address with SGLang's own
HTTP bootstrap server (``PUT /route``, the payload SGLang's backends send);
decode ranks read it back (``GET /route``) in :meth:`try_ensure_parallel_info`
and when a receiver starts.

Decode also answers the two calls SGLang's decode makes on its own schedule:
:meth:`~KvroomKVManager.submit_prefill_recompute` (a retracted request's KV
recomputed by its prefill, SGLang's PD rebootstrap: ``POST /generate`` to the
HTTP port each prefill rank registers, on a thread pool; a refusal fails the
room with the prefill's answer) and :meth:`~KvroomKVManager._ensure_prefill_recompute_executor`
(that thread pool, which SGLang's decode also uses for its prefill DP-rank
lookups; prefill senders register their DP rank when decode must ask for it).

Audit events go through SGLang's logging, as JSON lines on the stdlib logger
``sglang.srt.disaggregation.kvroom.audit``; with ``KVROOM_AUDIT_LOG=PATH`` they
are also appended, one JSON object per line, to ``PATH`` for ``kvroom audit``.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
import structlog
from sglang.srt.disaggregation.base.conn import BaseKVManager

from kvroom.config import ManagerConfig
from kvroom.fsm import Deadlines
from kvroom.integrations.sglang.regions import RankShape, Unsupported, model_layers, regions_from_kv_args
from kvroom.integrations.sglang.routes import seal, server_public_key
from kvroom.integrations.sglang.staging import AuxPacker, pool_from_kv_args
from kvroom.manager import KVManager
from kvroom.planning import RankRegions
from kvroom.transport.auth import AUTH_ENV, auth_settings
from kvroom.transport.layout import KVPool

__all__ = ["AUDIT_LOGGER", "KvroomKVManager", "audit_logger"]

AUDIT_LOGGER = "sglang.srt.disaggregation.kvroom.audit"
log = logging.getLogger("sglang.srt.disaggregation.kvroom")
_HTTP_TIMEOUT = 5.0
_REGISTER_TRIES = 60


def audit_logger() -> Any:
    """A structlog logger rendering kvroom's audit events as JSON onto SGLang's logging."""
    std = logging.getLogger(AUDIT_LOGGER)
    path = os.environ.get("KVROOM_AUDIT_LOG")
    if path and not any(getattr(h, "kvroom_audit", False) for h in std.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.kvroom_audit = True  # type: ignore[attr-defined]
        std.addHandler(handler)
        std.setLevel(logging.INFO)
    return structlog.wrap_logger(
        std,
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer(sort_keys=True)],
        wrapper_class=structlog.BoundLogger,
    )


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def _parallel(server_args: Any, args: Any) -> tuple[int, int, int, int]:
    """(attention TP size, attention TP rank, PP size, attention DP rank) of this scheduler."""
    try:
        from sglang.srt.runtime_context import get_parallel

        parallel = get_parallel()
        return (
            int(parallel.attn_tp_size),
            int(parallel.attn_tp_rank),
            int(parallel.pp_size),
            int(parallel.attn_dp_rank),
        )
    except Exception:  # not published (a scheduler always publishes it): read server_args
        tp = int(getattr(server_args, "tp_size", 1) or 1)
        dp = int(getattr(server_args, "dp_size", 1) or 1)
        if getattr(server_args, "enable_dp_attention", False):
            tp //= dp
        rank = int(getattr(args, "engine_rank", 0)) % tp
        return tp, rank, int(getattr(server_args, "pp_size", 1) or 1), 0


def _local_model_path(path: str, revision: str | None) -> str | None:
    """``path`` when it is on disk, else the Hugging Face cache's snapshot holding its ``config.json``.

    Never touches the network: the scheduler loaded the model before the KV
    manager is made, so a hub model's config is in the cache by now.
    """
    if os.path.exists(path):
        return path
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cached = try_to_load_from_cache(path, "config.json", revision=revision)
    except Exception:  # not a repo id at all
        return None
    return os.path.dirname(cached) if isinstance(cached, str) else None


def _model_config(server_args: Any) -> tuple[Any, str]:
    """(SGLang's ``ModelConfig`` of the served model or None, why it is None), read without the network.

    SGLang hands its backends no model config; building one from a hub id would
    retry the hub for ~50 s on a machine without network, so a model that is
    neither on disk nor in the cache is not read at all.
    """
    path = getattr(server_args, "model_path", None)
    args = server_args
    if path is not None:
        local = _local_model_path(str(path), getattr(server_args, "revision", None))
        if local is None:
            return None, f"model {path!r} is neither a local path nor in the Hugging Face cache"
        if local != path:
            args = copy.copy(server_args)
            args.model_path = local
    try:
        from sglang.srt.configs.model_config import ModelConfig

        return ModelConfig.from_server_args(args), ""
    except Exception as exc:
        return None, f"SGLang's ModelConfig could not be read: {type(exc).__name__}: {exc}"[:300]


def _kv_heads(args: Any, model: Any, tp: int, why: str = "") -> tuple[int, int]:
    """(KV heads this rank holds, the model's total KV heads).

    ``KVArgs.kv_head_num`` / ``total_kv_head_num`` (SGLang's prefill sets them),
    else the model config's total: a rank holds ``total / tp`` heads, or one
    replica when there are fewer heads than ranks.
    """
    local = int(getattr(args, "kv_head_num", 0) or 0)
    total = int(getattr(args, "total_kv_head_num", 0) or 0)
    if total <= 0:
        if model is None:
            raise ValueError(
                "kvroom needs the model's KV head count: KVArgs.total_kv_head_num is unset and the "
                f"model config could not be read ({why or 'no model path'})"
            )
        total = int(model.get_total_num_kv_heads())
    if local <= 0:
        local = max(1, total // tp)
    return local, total


def _layers(args: Any, model: Any, per_layer: int, pp_size: int, why: str = "") -> int:
    """The model's layer count: the model config's, else (no PP) what this rank's buffers span."""
    if model is not None and getattr(model, "num_hidden_layers", None):
        return int(model.num_hidden_layers)
    if pp_size > 1:
        raise ValueError(
            "kvroom needs the model's layer count with pipeline-parallel prefill and the model "
            f"config could not be read ({why or 'no model path'})"
        )
    return model_layers(args, per_layer)


def _serving(server_args: Any) -> tuple[int | None, str, str, int]:
    """(HTTP port, decode allocation policy, DP load-balance method, DP ranks) as SGLang published them."""
    try:
        from sglang.srt.runtime_context import get_disagg, get_parallel, get_serving

        port = get_serving().port
        policy = get_disagg().disaggregation_decode_allocation_policy
        parallel = get_parallel()
        method, ranks = parallel.load_balance_method, parallel.num_dp_ranks
    except Exception:  # not published (a scheduler always publishes it): read server_args
        port = getattr(server_args, "port", None)
        policy = getattr(server_args, "disaggregation_decode_allocation_policy", None)
        method = getattr(server_args, "load_balance_method", None)
        ranks = getattr(server_args, "dp_size", 1)
    return (
        int(port) if port is not None else None,
        str(policy or "early"),
        str(method or "follow_bootstrap_room"),
        int(ranks or 1),
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _bootstrap_url(server_args: Any) -> str:
    try:
        from sglang.srt.runtime_context import get_disagg, get_serving

        host, port = get_serving().host, get_disagg().disaggregation_bootstrap_port
    except Exception:
        host = getattr(server_args, "host", "127.0.0.1")
        port = server_args.disaggregation_bootstrap_port
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", None: "127.0.0.1"}.get(host, host)
    return f"http://{host}:{port}"


def _local_ip() -> str:
    try:
        from sglang.srt.utils.network import get_local_ip_auto

        return str(get_local_ip_auto("127.0.0.1"))
    except Exception:
        return os.environ.get("SGLANG_HOST_IP", "127.0.0.1")


class KvroomKVManager(BaseKVManager):  # type: ignore[misc]
    """One per scheduler process and role: owns the kvroom manager and its regions."""

    # kvroom's decode room turns Failed only once no WRITE for it can still land, so SGLang
    # may free a failed room's pages at once: no deferred release is needed.
    enable_deferred_decode_kv_release = False
    supports_deferred_decode_kv_release = False
    supports_host_destination = False
    # kvroom ranks have no context parallelism (attn_cp_size 1): one CP rank sends
    enable_all_cp_ranks_for_transfer = False

    def __init__(
        self, args: Any, disaggregation_mode: Any, server_args: Any, is_mla_backend: bool | None = False
    ) -> None:
        self.kv_args = args
        self.server_args = server_args
        self.disaggregation_mode = disaggregation_mode
        # a hybrid model whose full-attention layers are MLA lists one latent per layer too
        self.is_mla_backend = bool(is_mla_backend) or bool(getattr(args, "is_hybrid_mla_backend", False))
        role = str(getattr(disaggregation_mode, "value", disaggregation_mode))
        if role not in ("prefill", "decode"):
            raise ValueError(f"kvroom needs a prefill or decode scheduler, got mode {role!r}")
        self.role = role
        tp, rank, pp, dp_rank = _parallel(server_args, args)
        # prefill TP != decode TP: kvroom stages head slices through a ring of this many pages on
        # decode; without one it writes them in place, one descriptor per token row
        staging = int(os.environ.get("KVROOM_STAGING_PAGES", "0"))
        self.attn_tp_size, self.attn_tp_rank, self.pp_size, self.attn_dp_rank = tp, rank, pp, dp_rank
        self.attn_cp_size, self.attn_cp_rank = 1, 0
        self.aux: AuxPacker | None = None
        model, why = _model_config(server_args)
        heads = None if self.is_mla_backend else _kv_heads(args, model, tp, why)
        self.page_size = int(args.page_size)
        pp_rank = int(getattr(args, "pp_rank", 0) or 0)
        if staging:  # the staging ring lives on tensor pools, on both sides (see regions.py)
            if self.is_mla_backend or pp > 1:
                raise Unsupported(
                    "kvroom's staging ring (KVROOM_STAGING_PAGES) serves MHA pools without "
                    "pipeline parallelism only"
                )
            assert heads is not None
            self.aux = AuxPacker(args.aux_data_ptrs, args.aux_data_lens, args.aux_item_lens)
            pool: KVPool | RankRegions = pool_from_kv_args(
                args,
                kv_heads=heads[0],
                tp_rank=rank,
                tp_size=tp,
                aux=self.aux.packed,
                staging_pages=staging if role == "decode" else 0,
            )
        else:
            shape = RankShape(rank, tp, pp_rank, pp, self.is_mla_backend)
            layers = _layers(args, model, 1 if self.is_mla_backend else 2, pp, why)
            pool = regions_from_kv_args(args, shape, layers, heads)
        self.pool = pool
        deadlines = Deadlines(
            bootstrapping=_env_float("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", 300.0),
            waiting=_env_float("SGLANG_DISAGGREGATION_WAITING_TIMEOUT", 300.0),
            transferring=_env_float("KVROOM_TRANSFER_TIMEOUT", 30.0),
        )
        config = ManagerConfig(
            deadlines=deadlines,
            heartbeat_interval=_env_float("KVROOM_HEARTBEAT_INTERVAL", 0.5),
            heartbeat_timeout=_env_float("KVROOM_HEARTBEAT_TIMEOUT", 5.0),
            host=_local_ip(),
            transfer_mode="auto" if staging else "direct",
            # SGLang has no per-backend settings: keys come from KVROOM_KEY_FILE / KVROOM_TRUSTED_KEYS
            # (or KVROOM_ALLOW_UNAUTHENTICATED=1 on a trusted network); without them only loopback starts
            **auth_settings({name: os.environ.get(var) for name, var in AUTH_ENV.items()}),
        )
        self.kv = KVManager(role, self.pool, config=config, logger=audit_logger())
        self.regions: RankRegions = self.kv.regions
        kv = [r for key, r in self.regions.regions.items() if self.regions.pool.role_of(key) == "kv"]
        self.page_bytes = sum(r.item_bytes for r in kv)  # of one page, over every KV buffer held here
        self.bootstrap_url = _bootstrap_url(server_args)
        self.prefill_info_table: dict[str, Any] = {}
        self._rank_addrs: dict[tuple[str, int], list[str]] = {}
        self.transfer_infos: dict[int, Any] = {}  # read by SGLang's staging prefetch only
        self.http_port, self.allocation_policy, self.load_balance_method, self.dp_size = _serving(server_args)
        self.waiting_timeout = deadlines.waiting
        self._prefill_recompute_executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        if role == "prefill":
            self.register_to_bootstrap()

    # -- prefill ---------------------------------------------------------------

    def register_to_bootstrap(self) -> None:
        """``PUT /route`` this rank's kvroom control-plane address on SGLang's bootstrap server."""
        ip, port = self.kv.bootstrap_addr.rsplit(":", 1)
        payload = {
            "attn_tp_size": self.attn_tp_size,
            "attn_tp_rank": self.attn_tp_rank,
            "attn_cp_size": 1,
            "attn_cp_rank": 0,
            "attn_dp_size": int(getattr(self.server_args, "dp_size", 1) or 1),
            "attn_dp_rank": self.attn_dp_rank,
            "pp_size": self.pp_size,
            "pp_rank": int(getattr(self.kv_args, "pp_rank", 0) or 0),
            "system_dp_size": 1,
            "system_dp_rank": 0,
            "rank_ip": ip,
            "rank_port": int(port),
            "page_size": int(self.kv_args.page_size),
            "kv_cache_dtype": str(getattr(self.kv_args, "kv_cache_dtype_str", "auto")),
            "load_balance_method": self.load_balance_method,
            "prefill_http_port": self.http_port,  # where decode's rebootstrap asks for a recompute
            "decode_allocation_policy": self.allocation_policy,
        }
        keys = self.kv.config.keys
        if keys is not None:  # only a trusted prefill key writes the table (see routes.py)
            payload = seal(payload, keys.secret, server_public_key(keys.public))
        url, error = f"{self.bootstrap_url}/route", ""
        for _ in range(_REGISTER_TRIES):  # the server may still be starting, as SGLang's backends allow
            try:
                response = requests.put(url, json=payload, timeout=_HTTP_TIMEOUT)
            except requests.RequestException as exc:
                error = str(exc)
            else:
                if response.status_code == 200:
                    return
                error = f"status {response.status_code}: {response.text}"
            time.sleep(0.5)
        raise RuntimeError(f"kvroom prefill rank could not register at {url}: {error}")

    def must_register_dp_rank(self, has_dp_rank: bool) -> bool:
        """Whether a new room's DP rank goes to the bootstrap server: decode cannot derive it.

        As SGLang's own senders decide: several DP ranks, the request not routed to
        a rank by the router, and a load balance other than ``follow_bootstrap_room``
        (or ``SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK`` set).
        """
        if self.role != "prefill" or self.dp_size <= 1 or has_dp_rank:
            return False
        forced = _env_flag("SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK")
        return forced or self.load_balance_method != "follow_bootstrap_room"

    def register_dp_rank(self, bootstrap_room: int) -> None:
        """``POST /register_dp_rank``: this rank's DP rank for one room, for decode's lookup.

        Failures are logged, as SGLang's senders do: decode's lookup then waits and
        its room fails by its own deadline, never this scheduler.
        """
        payload = {"bootstrap_room": int(bootstrap_room), "dp_rank": self.attn_dp_rank}
        try:
            url = f"{self.bootstrap_url}/register_dp_rank"
            response = requests.post(url, json=payload, timeout=_HTTP_TIMEOUT)
        except requests.RequestException as exc:
            log.error("kvroom: could not register room %s's DP rank: %s", bootstrap_room, exc)
            return
        if response.status_code != 200:
            log.error("kvroom: could not register room %s's DP rank: %s", bootstrap_room, response.text[:200])

    # -- decode ----------------------------------------------------------------

    def _ensure_prefill_recompute_executor(self) -> ThreadPoolExecutor:
        """The thread pool SGLang's decode runs its bootstrap-server lookups and recomputes on (lazy).

        ``SGLANG_DISAGGREGATION_THREAD_POOL_SIZE`` threads (16 when unset), as SGLang's
        own backends; shut down by :meth:`close`.
        """
        with self._executor_lock:
            if self._prefill_recompute_executor is None:
                workers = int(os.environ.get("SGLANG_DISAGGREGATION_THREAD_POOL_SIZE") or 16)
                self._prefill_recompute_executor = ThreadPoolExecutor(
                    max_workers=max(1, workers), thread_name_prefix="kvroom-prefill-recompute"
                )
            return self._prefill_recompute_executor

    def prefill_http_url(self, bootstrap_addr: str) -> str | None:
        """``http://host:port`` of a prefill's HTTP API (bootstrap host, the port its ranks registered)."""
        info = self.prefill_info_table.get(bootstrap_addr)
        port = getattr(info, "prefill_http_port", None)
        if port is None:
            return None
        host = bootstrap_addr.rsplit(":", 1)[0]
        return f"http://{host}:{int(port)}"

    def submit_prefill_recompute(self, kv_receiver: Any, payload: dict[str, Any]) -> None:
        """SGLang's PD rebootstrap: ask the prefill to recompute a retracted request's KV into its room.

        The decode scheduler calls this on every rank of the request's group; one
        ``POST /generate`` suffices (the prefill serves every decode rank from it),
        so only the group's first rank sends it, from the thread pool: the
        scheduler's loop never waits on HTTP.  The prefill's room for the same
        id then sends the recomputed pages to the receiver that already sent its
        page list.  No URL, an error status or no answer fails the receiver's room
        with that reason.
        """
        if self.attn_tp_rank != 0 or int(getattr(self.kv_args, "pp_rank", 0) or 0) != 0:
            return
        url = self.prefill_http_url(kv_receiver.bootstrap_addr)
        if url is None:
            kv_receiver.fail(
                f"PD rebootstrap: prefill at {kv_receiver.bootstrap_addr} registered no HTTP port to "
                "recompute the request on"
            )
            return
        self._ensure_prefill_recompute_executor().submit(self._recompute, kv_receiver, url, dict(payload))

    def _recompute(self, kv_receiver: Any, url: str, payload: dict[str, Any]) -> None:
        rid = payload.get("rid")
        try:
            response = requests.post(f"{url}/generate", json=payload, timeout=self.waiting_timeout)
        except requests.RequestException as exc:
            kv_receiver.fail(f"PD rebootstrap of rid={rid}: POST {url}/generate failed: {exc}")
            return
        if response.status_code >= 400:
            status, text = response.status_code, response.text[:200]
            kv_receiver.fail(f"PD rebootstrap of rid={rid}: {url}/generate answered {status}: {text}")

    def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
        """Fetch the prefill's parallel sizes from its bootstrap server; False while not ready."""
        if bootstrap_addr in self.prefill_info_table:
            return True
        from sglang.srt.disaggregation.common.conn import PrefillServerInfo

        query = {k: -1 for k in ("prefill_dp_rank", "prefill_cp_rank", "target_tp_rank", "target_pp_rank")}
        try:
            response = requests.get(f"http://{bootstrap_addr}/route", params=query, timeout=_HTTP_TIMEOUT)
        except requests.RequestException as exc:
            log.warning("kvroom: bootstrap server %s unreachable: %s", bootstrap_addr, exc)
            return False
        if response.status_code != 200:
            return False
        self.prefill_info_table[bootstrap_addr] = PrefillServerInfo(**response.json())
        return True

    def prefill_rank_addresses(self, bootstrap_addr: str, prefill_dp_rank: int) -> list[str]:
        """kvroom addresses of every prefill rank of one DP group, stage-major then TP rank (cached)."""
        key = (bootstrap_addr, prefill_dp_rank)
        if key in self._rank_addrs:
            return self._rank_addrs[key]
        if not self.try_ensure_parallel_info(bootstrap_addr):
            raise ConnectionError(f"prefill bootstrap server {bootstrap_addr} is not ready")
        info = self.prefill_info_table[bootstrap_addr]
        addrs = []
        for pp_rank in range(int(info.pp_size or 1)):  # stage-major, as kvroom's receiver takes them
            for tp_rank in range(int(info.attn_tp_size)):
                query = {"prefill_dp_rank": prefill_dp_rank, "prefill_cp_rank": 0}
                query.update(target_tp_rank=tp_rank, target_pp_rank=pp_rank)
                url = f"http://{bootstrap_addr}/route"
                response = requests.get(url, params=query, timeout=_HTTP_TIMEOUT)
                if response.status_code != 200:
                    raise ConnectionError(f"bootstrap server {bootstrap_addr}: {response.text}")
                rank = response.json()
                addrs.append(f"{rank['rank_ip']}:{rank['rank_port']}")
        self._rank_addrs[key] = addrs
        return addrs

    def is_abort_release_safe(self, bootstrap_room: int, required_acks: int = 0) -> bool:
        """True once kvroom holds nothing of the room: no WRITE for it can still land."""
        return not self.kv.footprint(bootstrap_room)

    def clear_deferred_abort_state(self, bootstrap_room: int) -> None:
        """Nothing to clear: kvroom keeps no deferred-abort state outside the room."""

    def should_verify_kv_checksum(self, bootstrap_addr: str) -> bool:
        """A prefill digest covers this rank's bytes only when both sides run the same attention TP.

        kvroom carries SGLang's checksum row like any metadata row; with another TP width
        each decode rank holds other heads than the prefill rank digested.
        """
        info = self.prefill_info_table.get(bootstrap_addr)
        return info is not None and int(info.attn_tp_size) == self.attn_tp_size

    def close(self) -> None:
        """Stop the kvroom manager (worker thread, sockets, NIXL registrations) and the thread pool."""
        executor = self._prefill_recompute_executor
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self.kv.close()
