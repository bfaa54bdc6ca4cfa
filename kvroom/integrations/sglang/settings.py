"""What the SGLang manager reads from SGLang: server args, its runtime context, the environment.

SGLang publishes a scheduler's parallel sizes, serving ports and bootstrap
address in ``sglang.srt.runtime_context`` (newer releases) or on its
``ServerArgs`` (older ones); each reader here tries the first and falls back
to the second.  The model's layer count and KV heads come from ``KVArgs`` where
it has them, else from SGLang's ``ModelConfig``, built only from a local path
or the Hugging Face cache (never the network: a model that is not local would
wait on hub retries).  Also: the audit logger, and the ``KVROOM_*`` /
``SGLANG_*`` environment knobs.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import structlog

from kvroom.integrations.sglang.regions import model_layers

__all__ = [
    "AUDIT_LOGGER",
    "audit_logger",
    "bootstrap_url",
    "env_flag",
    "env_float",
    "kv_heads",
    "layer_count",
    "local_ip",
    "local_model_path",
    "model_config",
    "parallel_sizes",
    "serving",
]

AUDIT_LOGGER = "sglang.srt.disaggregation.kvroom.audit"


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


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def parallel_sizes(server_args: Any, args: Any) -> tuple[int, int, int, int]:
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


def local_model_path(path: str, revision: str | None) -> str | None:
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


def model_config(server_args: Any) -> tuple[Any, str]:
    """(SGLang's ``ModelConfig`` of the served model or None, why it is None), read without the network.

    SGLang hands its backends no model config; building one from a hub id would
    retry the hub for ~50 s on a machine without network, so a model that is
    neither on disk nor in the cache is not read at all.
    """
    path = getattr(server_args, "model_path", None)
    args = server_args
    if path is not None:
        local = local_model_path(str(path), getattr(server_args, "revision", None))
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


def kv_heads(args: Any, model: Any, tp: int, why: str = "") -> tuple[int, int]:
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


def layer_count(args: Any, model: Any, per_layer: int, pp_size: int, why: str = "") -> int:
    """The model's layer count: the model config's, else (no PP) what this rank's buffers span."""
    if model is not None and getattr(model, "num_hidden_layers", None):
        return int(model.num_hidden_layers)
    if pp_size > 1:
        raise ValueError(
            "kvroom needs the model's layer count with pipeline-parallel prefill and the model "
            f"config could not be read ({why or 'no model path'})"
        )
    return model_layers(args, per_layer)


def serving(server_args: Any) -> tuple[int | None, str, str, int]:
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


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def bootstrap_url(server_args: Any) -> str:
    try:
        from sglang.srt.runtime_context import get_disagg, get_serving

        host, port = get_serving().host, get_disagg().disaggregation_bootstrap_port
    except Exception:
        host = getattr(server_args, "host", "127.0.0.1")
        port = server_args.disaggregation_bootstrap_port
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", None: "127.0.0.1"}.get(host, host)
    return f"http://{host}:{port}"


def local_ip() -> str:
    try:
        from sglang.srt.utils.network import get_local_ip_auto

        return str(get_local_ip_auto("127.0.0.1"))
    except Exception:
        return os.environ.get("SGLANG_HOST_IP", "127.0.0.1")
