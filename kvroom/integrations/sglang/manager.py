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

Decode also answers the two calls SGLang's decode makes on its own schedule
(SGLang's PD rebootstrap and the thread pool it shares with its DP-rank
lookups): :class:`~kvroom.integrations.sglang.recompute.PrefillRecompute`.
Prefill senders register their DP rank when decode must ask for it.

Audit events go through SGLang's logging, as JSON lines on the stdlib logger
``sglang.srt.disaggregation.kvroom.audit``; with ``KVROOM_AUDIT_LOG=PATH`` they
are also appended, one JSON object per line, to ``PATH`` for ``kvroom audit``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
from sglang.srt.disaggregation.base.conn import BaseKVManager

from kvroom.config import ManagerConfig
from kvroom.fsm import Deadlines
from kvroom.integrations.sglang.recompute import PrefillRecompute
from kvroom.integrations.sglang.regions import RankShape, Unsupported, regions_from_kv_args
from kvroom.integrations.sglang.routes import seal, server_public_key
from kvroom.integrations.sglang.settings import (
    AUDIT_LOGGER,
    audit_logger,
    bootstrap_url,
    env_flag,
    env_float,
    kv_heads,
    layer_count,
    local_ip,
    model_config,
    parallel_sizes,
    serving,
)
from kvroom.integrations.sglang.staging import AuxPacker, pool_from_kv_args
from kvroom.manager import KVManager
from kvroom.planning import RankRegions
from kvroom.transport.auth import AUTH_ENV, auth_settings
from kvroom.transport.layout import KVPool

__all__ = ["AUDIT_LOGGER", "KvroomKVManager", "audit_logger"]

log = logging.getLogger("sglang.srt.disaggregation.kvroom")
_HTTP_TIMEOUT = 5.0
_REGISTER_TRIES = 60


class KvroomKVManager(PrefillRecompute, BaseKVManager):  # type: ignore[misc]
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
        tp, rank, pp, dp_rank = parallel_sizes(server_args, args)
        # prefill TP != decode TP: kvroom stages head slices through a ring of this many pages on
        # decode; without one it writes them in place, one descriptor per token row
        staging = int(os.environ.get("KVROOM_STAGING_PAGES", "0"))
        self.attn_tp_size, self.attn_tp_rank, self.pp_size, self.attn_dp_rank = tp, rank, pp, dp_rank
        self.attn_cp_size, self.attn_cp_rank = 1, 0
        self.aux: AuxPacker | None = None
        model, why = model_config(server_args)
        heads = None if self.is_mla_backend else kv_heads(args, model, tp, why)
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
            layers = layer_count(args, model, 1 if self.is_mla_backend else 2, pp, why)
            pool = regions_from_kv_args(args, shape, layers, heads)
        self.pool = pool
        deadlines = Deadlines(
            bootstrapping=env_float("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", 300.0),
            waiting=env_float("SGLANG_DISAGGREGATION_WAITING_TIMEOUT", 300.0),
            transferring=env_float("KVROOM_TRANSFER_TIMEOUT", 30.0),
        )
        config = ManagerConfig(
            deadlines=deadlines,
            heartbeat_interval=env_float("KVROOM_HEARTBEAT_INTERVAL", 0.5),
            heartbeat_timeout=env_float("KVROOM_HEARTBEAT_TIMEOUT", 5.0),
            busy_poll_interval=env_float("KVROOM_BUSY_POLL_INTERVAL", ManagerConfig.busy_poll_interval),
            target_poll_interval=env_float("KVROOM_TARGET_POLL_INTERVAL", ManagerConfig.target_poll_interval),
            host=local_ip(),
            transfer_mode="auto" if staging else "direct",
            # SGLang has no per-backend settings: keys come from KVROOM_KEY_FILE / KVROOM_TRUSTED_KEYS
            # (or KVROOM_ALLOW_UNAUTHENTICATED=1 on a trusted network); without them only loopback starts
            **auth_settings({name: os.environ.get(var) for name, var in AUTH_ENV.items()}),
        )
        self.kv = KVManager(role, self.pool, config=config, logger=audit_logger())
        self.regions: RankRegions = self.kv.regions
        kv = [r for key, r in self.regions.regions.items() if self.regions.pool.role_of(key) == "kv"]
        self.page_bytes = sum(r.item_bytes for r in kv)  # of one page, over every KV buffer held here
        self.bootstrap_url = bootstrap_url(server_args)
        self.prefill_info_table: dict[str, Any] = {}
        self._rank_addrs: dict[tuple[str, int], list[str]] = {}
        self.transfer_infos: dict[int, Any] = {}  # read by SGLang's staging prefetch only
        self.http_port, self.allocation_policy, self.load_balance_method, self.dp_size = serving(server_args)
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
        forced = env_flag("SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK")
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
