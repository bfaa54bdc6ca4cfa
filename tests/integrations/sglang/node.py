"""One SGLang scheduler rank as a real process, driven through SGLang's own code.

Each process loads SGLang's plugins (which finds kvroom's entry point), takes
the classes ``get_kv_class(TransferBackend("kvroom"), ...)`` returns, fills a
``KVArgs`` the way ``_init_kv_manager`` does (MHA token pools as CPU tensors,
SGLang's ``MetadataBuffers`` as aux) and polls with ``poll_and_all_reduce``
on a gloo group.  The test calls :class:`SchedulerRank` methods over a pipe
(:class:`tests.integrations.sglang.cluster.Node`); children die with their parent.
"""

from __future__ import annotations

import math
import os
import time
import traceback
import types
from multiprocessing.connection import Connection
from typing import Any

LAYERS, PAGE_SIZE, HEADS, HEAD_DIM, PAGES, AUX_ROWS = 2, 4, 4, 8, 48, 8
TERMINAL = ("Success", "Failed")


def pattern(layer: int, kind: int, slots: Any, heads: Any) -> Any:
    """What prefill holds in token slots ``slots`` for global ``heads`` (unique per element)."""
    import torch

    s = torch.as_tensor(slots).view(-1, 1, 1)
    h = torch.as_tensor(heads).view(1, -1, 1)
    d = torch.arange(HEAD_DIM).view(1, 1, -1)
    return (layer * 10_000_000 + kind * 5_000_000 + s * 1000 + h * 50 + d + 1).to(torch.int32)


class SchedulerRank:
    """What runs in a rank process: one kvroom manager made through SGLang's plugin, its requests."""

    def __init__(self) -> None:
        self.mgr: Any = None
        self.requests: dict[int, Any] = {}
        self.group: Any = None

    # -- set-up, the way SGLang's scheduler does it ------------------------------

    def start(
        self,
        role: str,
        rank: int,
        size: int,
        bootstrap_port: int,
        gloo_port: int,
        serve_bootstrap: bool,
        env: dict[str, str] | None = None,
    ) -> str:
        """Load SGLang's plugins and make this rank's kvroom manager through ``get_kv_class``."""
        os.environ.update(env or {})
        os.environ.setdefault("SGLANG_HOST_IP", "127.0.0.1")
        import torch
        import torch.distributed as dist

        from tests.integrations.sglang import shim

        shim.install()
        from sglang.srt.plugins import load_plugins

        load_plugins()  # finds kvroom through the sglang.srt.plugins entry point
        from sglang.srt.disaggregation.utils import (  # after the plugin's hooks were applied
            DisaggregationMode,
            KVClassType,
            MetadataBuffers,
            TransferBackend,
            get_kv_class,
        )

        backend = TransferBackend("kvroom")
        self.classes = {t: get_kv_class(backend, t) for t in KVClassType}
        if serve_bootstrap:
            self.server = self.classes[KVClassType.BOOTSTRAP_SERVER](host="127.0.0.1", port=bootstrap_port)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{gloo_port}", rank=rank, world_size=size
        )
        self.group = dist.group.WORLD
        self.role, self.rank, self.size, self.bootstrap_port = role, rank, size, bootstrap_port
        heads = HEADS // size
        self.heads = list(range(rank * heads, (rank + 1) * heads))
        tokens = (PAGES + 1) * PAGE_SIZE  # SGLang's pools keep one extra page
        self.k = [torch.zeros(tokens, heads, HEAD_DIM, dtype=torch.int32) for _ in range(LAYERS)]
        self.v = [torch.zeros(tokens, heads, HEAD_DIM, dtype=torch.int32) for _ in range(LAYERS)]
        if role == "prefill":
            for layer in range(LAYERS):
                self.k[layer].copy_(pattern(layer, 0, range(tokens), self.heads))
                self.v[layer].copy_(pattern(layer, 1, range(tokens), self.heads))
        self.meta = MetadataBuffers(AUX_ROWS, 16, torch.float32, 16)
        args = self.classes[KVClassType.KVARGS]()
        bufs = [*self.k, *self.v]
        args.engine_rank = rank
        args.kv_data_ptrs = [b.data_ptr() for b in bufs]
        args.kv_data_lens = [b.nbytes for b in bufs]
        args.kv_item_lens = [b[0].nbytes * PAGE_SIZE for b in bufs]
        args.kv_layer_ids = list(range(LAYERS)) * 2
        args.kv_cache_dtype_str = "auto"
        args.page_size = PAGE_SIZE
        args.pp_rank, args.prefill_start_layer, args.system_dp_rank = 0, 0, 0
        args.aux_data_ptrs, args.aux_data_lens, args.aux_item_lens = self.meta.get_buf_infos()
        args.state_types, args.state_data_ptrs, args.state_data_lens, args.state_item_lens = [], [], [], []
        args.ib_device, args.gpu_id = None, 0
        args.kv_head_num, args.total_kv_head_num = heads, HEADS
        server_args = types.SimpleNamespace(
            tp_size=size, dp_size=1, pp_size=1, host="127.0.0.1", disaggregation_bootstrap_port=bootstrap_port
        )
        mode = DisaggregationMode.PREFILL if role == "prefill" else DisaggregationMode.DECODE
        self.mgr = self.classes[KVClassType.MANAGER](args, mode, server_args, False)
        return type(self.mgr).__module__ + "." + type(self.mgr).__name__

    def class_names(self) -> dict[str, str]:
        return {t.value: f"{c.__module__}.{c.__name__}" for t, c in self.classes.items() if c is not None}

    def polls(self, rooms: list[int]) -> list[str]:
        """``poll_and_all_reduce`` over the rooms, MIN-reduced on the gloo group (collective)."""
        from sglang.srt.disaggregation.base.conn import KVPoll
        from sglang.srt.disaggregation.utils import poll_and_all_reduce

        names = {
            getattr(KVPoll, n): n for n in ("Failed", "Bootstrapping", "WaitingForInput", "Transferring")
        }
        names[KVPoll.Success] = "Success"
        return [names[p] for p in poll_and_all_reduce([self.requests[r] for r in rooms], self.group)]

    def wait(self, rooms: list[int], states: list[str], timeout: float) -> dict[int, str]:
        """Poll (collectively) until every room is in one of ``states``, or the timeout."""
        end = time.monotonic() + timeout
        while True:
            got = dict(zip(rooms, self.polls(rooms), strict=True))
            done = all(s in states for s in got.values())
            if self.size > 1:  # every rank of the group leaves the loop together
                import torch
                import torch.distributed as dist

                flag = torch.tensor([int(done or time.monotonic() > end)])
                dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
                if flag.item():
                    return got
            elif done or time.monotonic() > end:
                return got
            time.sleep(0.005)

    # -- prefill -----------------------------------------------------------------

    def sender(self, room: int) -> None:
        from sglang.srt.disaggregation.utils import KVClassType

        cls = self.classes[KVClassType.SENDER]
        self.requests[room] = cls(self.mgr, f"127.0.0.1:{self.bootstrap_port}", room)

    def begin(self, room: int, tokens: int, aux: int) -> int:
        """After bootstrap: the decode prefix (tokens), ``init`` with the pages after it."""
        tx = self.requests[room]
        prefix = tx.pop_decode_prefix_len()
        self.meta.output_ids[aux][0] = room % 1000 + 1
        self.meta.bootstrap_room[aux][0] = room
        tx.init(math.ceil((tokens - prefix) / PAGE_SIZE), aux)
        return int(prefix)

    def chunk(self, room: int, pages: list[int], last: bool) -> bool:
        """One chunk the way SGLang's ``send_kv_chunk`` does it; False if it was skipped."""
        import numpy as np

        tx = self.requests[room]
        if not tx.should_send_kv_chunk(len(pages), last):
            return False
        tx.send(np.asarray(pages, dtype=np.int32), None, num_kv_tokens=len(pages) * PAGE_SIZE)
        return True

    def metric(self, room: int) -> dict[str, Any]:
        m = self.requests[room].get_transfer_metric()
        return {"latency": m.transfer_latency_s, "bytes": m.transfer_total_bytes}

    # -- decode ------------------------------------------------------------------

    def receiver(self, room: int, addr: str, dst: list[int], aux: int, prefix_tokens: int = 0) -> None:
        import numpy as np
        from sglang.srt.disaggregation.utils import KVClassType

        deadline = time.monotonic() + 60
        while not self.mgr.try_ensure_parallel_info(addr):
            if time.monotonic() > deadline:
                raise TimeoutError("prefill never registered")
            time.sleep(0.05)
        rx = self.classes[KVClassType.RECEIVER](mgr=self.mgr, bootstrap_addr=addr, bootstrap_room=room)
        rx.init(0)
        self.meta.clear_slot(aux)
        rx.send_metadata(np.asarray(dst, dtype=np.int32), aux, None, decode_prefix_len=prefix_tokens)
        self.requests[room] = rx

    def holds(self, dst: list[int], src: list[int]) -> bool:
        """Decode pages ``dst`` hold prefill pages ``src`` for every head (K and V of every layer)."""
        import torch

        heads = list(range(HEADS))
        for layer in range(LAYERS):
            for kind, bufs in ((0, self.k), (1, self.v)):
                for d, s in zip(dst, src, strict=True):
                    got = bufs[layer][d * PAGE_SIZE : (d + 1) * PAGE_SIZE]
                    want = pattern(layer, kind, range(s * PAGE_SIZE, (s + 1) * PAGE_SIZE), heads)
                    if not torch.equal(got, want):
                        return False
        return True

    def untouched(self, pages: list[int]) -> bool:
        return all(bool((b[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] == 0).all()) for b in self.k for p in pages)

    def aux(self, row: int) -> tuple[int, int]:
        return int(self.meta.bootstrap_room[row][0]), int(self.meta.output_ids[row][0])

    def queue_add(self, room: int, aux: int) -> None:
        """Hand a receiver to SGLang's ``DecodeTransferQueue`` (made once, without a scheduler).

        The queue is SGLang's class with its polling, metadata gate, failure handling and
        metadata-row release; only what touches the model's request state is recorded
        instead: committing a finished request and releasing its KV cache.
        """
        from sglang.srt.disaggregation.decode import DecodeRequest, DecodeTransferQueue

        if getattr(self, "queue", None) is None:
            queue = DecodeTransferQueue.__new__(DecodeTransferQueue)
            self.committed: list[int] = []
            self.released: list[int] = []
            self.freed: list[int] = []
            streamer = types.SimpleNamespace(stream_output=lambda reqs, logprob: None)
            queue.__dict__.update(
                queue=[],
                gloo_group=self.group,
                req_to_metadata_buffer_idx_allocator=types.SimpleNamespace(free=self.freed.append),
                tp_rank=self.rank,
                metadata_buffers=self.meta,
                scheduler=types.SimpleNamespace(
                    enable_decode_hicache=False,
                    enable_hisparse=False,
                    kv_checksum_computer=None,
                    output_streamer=streamer,
                    metrics_reporter=types.SimpleNamespace(enable_metrics=False),
                ),
                enable_host_receive=False,
                tree_cache=types.SimpleNamespace(unlock=lambda lock: None),  # no prefix cache here
                enable_staging=False,
                staging_handler=None,
                enable_deferred_kv_release=True,  # asked for: kvroom's manager declines it
                deferred_kv_release_timeout=30.0,
                _deferred_releases=[],
                _skipped_checksum_signatures=set(),
            )

            def commit(dr: Any) -> None:  # the real one fills the request, then clears the receiver
                self.committed.append(dr.req.bootstrap_room)
                dr.kv_receiver.clear()
                dr.kv_receiver = None

            queue._commit_transfer_to_req = commit
            queue._release_request = lambda dr: self.released.append(dr.req.bootstrap_room)
            self.queue = queue
        req = types.SimpleNamespace(
            rid=f"req-{room}",
            bootstrap_room=room,
            bootstrap_host="127.0.0.1",
            finished_reason=None,
            return_logprob=False,
        )
        self.queue.add(DecodeRequest(req=req, kv_receiver=self.requests[room], metadata_buffer_index=aux))

    def queue_pop(self) -> dict[str, list[int]]:
        """One ``pop_transferred()`` of SGLang's queue: what it popped, committed, released, freed."""
        popped = [r.bootstrap_room for r in self.queue.pop_transferred()]
        return {
            "popped": popped,
            "committed": list(self.committed),
            "released": list(self.released),
            "freed": list(self.freed),
            "queued": [dr.req.bootstrap_room for dr in self.queue.queue],
            "deferred": len(self.queue._deferred_releases),
        }

    # -- both --------------------------------------------------------------------

    def failure(self, room: int) -> dict[str, Any]:
        """What ``failure_exception()`` raised: type, reason, cause, is_from_another_rank."""
        try:
            self.requests[room].failure_exception()
        except Exception as exc:
            return {
                "type": type(exc).__name__,
                "reason": str(getattr(exc, "failure_reason", exc)),
                "cause": type(exc.__cause__).__name__ if exc.__cause__ else None,
                "another_rank": bool(getattr(exc, "is_from_another_rank", False)),
            }
        return {}

    def abort(self, room: int) -> None:
        self.requests[room].abort()

    def clear(self, room: int, times: int = 1) -> None:
        for _ in range(times):
            self.requests[room].clear()

    def footprint(self, room: int) -> list[str]:
        return sorted(self.mgr.kv.footprint(room))

    def release_safe(self, room: int) -> bool:
        return bool(self.mgr.is_abort_release_safe(room, 1))

    def live_rooms(self) -> int:
        return len(self.mgr.kv.table.live_rooms())


def _serve(conn: Connection) -> None:
    from kvroom.demo.nodes import die_with_parent

    die_with_parent()
    server = SchedulerRank()
    while True:
        try:
            method, args, kwargs = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", getattr(server, method)(*args, **kwargs)))
        except Exception as exc:
            conn.send(("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
