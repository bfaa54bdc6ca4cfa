"""vLLM pieces for the connector tests: a local model config, the real v1 Scheduler, vLLM-shaped
KV caches, and an engine loop that runs the worker-side connector the way vLLM's model runner does.

Import only after ``pytest.importorskip("vllm")``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request

from kvroom.integrations.vllm import KVRoomConnector

BLOCK, KV_HEADS, HEAD, LAYERS, BLOCKS = 16, 2, 16, 2, 64
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
SPEC = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD, dtype=torch.float32)
MODEL = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": KV_HEADS * 2 * HEAD,
    "intermediate_size": 128,
    "num_attention_heads": KV_HEADS * 2,
    "num_key_value_heads": KV_HEADS,
    "num_hidden_layers": LAYERS,
    "vocab_size": 1000,
    "max_position_embeddings": 2048,
    "torch_dtype": "float32",
    "rms_norm_eps": 1e-5,
}


def model_dir(path: Path) -> str:
    """A local model directory with only config.json (no hub, no weights)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(MODEL))
    return str(path)


def vllm_config(model: str, role: str, policy: str = "fail", **extra: Any) -> VllmConfig:
    """A CPU VllmConfig whose KV connector is kvroom's, loaded by module path."""
    transfer = KVTransferConfig(
        kv_connector="KVRoomConnector",
        kv_connector_module_path="kvroom.integrations.vllm",
        kv_role=role,
        kv_load_failure_policy=policy,
        kv_connector_extra_config={"audit": False, **extra},
    )
    config = VllmConfig(
        model_config=ModelConfig(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=2048),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
        scheduler_config=SchedulerConfig(
            max_num_batched_tokens=2048, max_num_seqs=16, max_model_len=2048, is_encoder_decoder=False
        ),
        kv_transfer_config=transfer,
        device_config=DeviceConfig("cpu"),
    )
    config.cache_config.num_gpu_blocks = BLOCKS
    return config


def kv_cache_config() -> KVCacheConfig:
    """One full-attention group over every layer, BLOCKS blocks."""
    return KVCacheConfig(
        num_blocks=BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(LAYER_NAMES, SPEC)]
    )


def make_scheduler(config: VllmConfig) -> Scheduler:
    """vLLM's real v1 scheduler; its connector is built by vLLM's connector factory."""
    from vllm.v1.structured_output import StructuredOutputManager

    return Scheduler(config, kv_cache_config(), StructuredOutputManager(config), block_size=BLOCK)


def kv_caches(
    layout: KVCacheLayout = KVCacheLayout.LBNHC, kv_heads: int = KV_HEADS
) -> dict[str, torch.Tensor]:
    """Per-layer cache views exactly as vLLM 0.33 allocates them (one backing tensor per layer);
    ``kv_heads``: this rank's heads (fewer than the model's under tensor parallelism)."""
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=kv_heads, head_size=HEAD, dtype=torch.float32)
    page = spec.page_size_bytes
    caches: dict[str, torch.Tensor] = {}
    for name in LAYER_NAMES:
        raw = torch.zeros(page * BLOCKS, dtype=torch.int8)
        tensor = KVCacheTensor(
            size=page * BLOCKS, layers=[name], layer_stride=page * BLOCKS, block_stride=page
        )
        (caches[name],) = create_kv_cache_views(raw, spec, BLOCKS, layout, tensor)
    return caches


def worker_connector(config: VllmConfig, caches: dict[str, torch.Tensor]) -> KVRoomConnector:
    """The worker-side connector with ``caches`` registered (starts kvroom's manager)."""
    connector = KVRoomConnector(config, KVConnectorRole.WORKER, kv_cache_config())
    connector.register_kv_caches(caches)
    return connector


_HASHER: Any = None


def request(req_id: str, prompt: list[int], params: dict[str, Any] | None, max_tokens: int = 1) -> Request:
    """A vLLM request with block hashes (prefix caching) and ``kv_transfer_params``."""
    global _HASHER
    if _HASHER is None:
        init_none_hash(sha256)
        _HASHER = get_request_block_hasher(BLOCK, sha256)
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    sampling.extra_args = {"kv_transfer_params": params} if params else None
    req = Request(req_id, prompt, sampling, None, block_hasher=_HASHER)
    req.kv_transfer_params = dict(params) if params else None
    return req


def pages(tokens: int) -> int:
    """Blocks holding ``tokens`` tokens."""
    return math.ceil(tokens / BLOCK)


class Engine:
    """One vLLM engine core: the real scheduler, and the worker-side connector stepped like
    vLLM's model runner does (bind metadata, start_load_kv, wait_for_save, transfer results,
    load errors, stats, clear).  The model is a stub that samples token 7."""

    def __init__(self, config: VllmConfig, caches: dict[str, torch.Tensor] | None = None) -> None:
        self.scheduler = make_scheduler(config)
        self.connector: KVRoomConnector = self.scheduler.connector
        self.worker = worker_connector(config, caches if caches is not None else kv_caches())
        meta = self.worker.get_handshake_metadata()
        self.connector.set_xfer_handshake_metadata({0: meta})
        self.outputs: dict[str, Any] = {}  # req id -> its final EngineCoreOutput
        self.computed: dict[str, int] = {}  # req id -> tokens the stub model computed for it
        self.stats: list[dict[str, Any]] = []

    def step(self) -> None:
        """One schedule / execute / update_from_output round."""
        out = self.scheduler.schedule()
        worker = self.worker
        worker.bind_connector_metadata(out.kv_connector_metadata)
        worker.start_load_kv(None)
        worker.wait_for_save()
        results = worker.get_transfer_results(out.finished_req_ids)
        kv = KVConnectorOutput(
            finished_sending=results.finished_sending or None,
            finished_recving=results.finished_recving or None,
            failed_recving=results.failed_recving,
            invalid_block_ids=worker.get_block_ids_with_load_errors(),
            kv_connector_stats=worker.get_kv_connector_stats(),
        )
        if kv.kv_connector_stats is not None:
            self.stats.append(kv.kv_connector_stats.data)
        worker.clear_connector_metadata()
        ids = list(out.num_scheduled_tokens)
        for req_id, n in out.num_scheduled_tokens.items():
            self.computed[req_id] = self.computed.get(req_id, 0) + n
        runner = ModelRunnerOutput(
            req_ids=ids,
            req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=[[7] for _ in ids],
            kv_connector_output=kv,
        )
        for outputs in self.scheduler.update_from_output(out, runner).values():
            for o in outputs.outputs:
                if o.finish_reason is not None:
                    self.outputs[o.request_id] = o

    def held(self, req_id: str, room: int) -> list[str]:
        """What the scheduler, its connector and the worker connector still hold for a request."""
        sched = self.scheduler
        found = [name for name in ("requests",) if req_id in sched.requests]
        found += [f"{name}" for name in ("finished_recving_kv_req_ids", "failed_recving_kv_req_ids")
                  if req_id in getattr(sched, name)]  # fmt: skip
        if any(r.request_id == req_id for r in [*sched.running, *sched.waiting]):
            found.append("queues")
        assert self.connector.scheduler is not None and self.worker.worker is not None
        found += [f"connector.{n}" for n in self.connector.scheduler.held(req_id)]
        found += [f"worker.{n}" for n in self.worker.worker.held(req_id, room)]
        return found

    def close(self) -> None:
        """Stop the worker-side connector."""
        self.worker.shutdown()
