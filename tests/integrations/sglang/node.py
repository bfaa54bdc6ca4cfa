"""One SGLang scheduler rank as a real process, driven through SGLang's own code.

Each process loads SGLang's plugins (which finds kvroom's entry point), takes
the classes ``get_kv_class(TransferBackend("kvroom"), ...)`` returns, fills a
``KVArgs`` the way ``_init_kv_manager`` and ``setup_state_kv_args`` do (the
family's pools of :mod:`tests.integrations.sglang.families` as CPU tensors,
SGLang's ``MetadataBuffers`` as aux) and polls with ``poll_and_all_reduce``
on a gloo group of its TP ranks.  The test calls :class:`SchedulerRank`
methods over a pipe (:class:`tests.integrations.sglang.cluster.Node`, served by
:func:`tests.ranks._serve`); children die with their parent.
"""

from __future__ import annotations

import math
import os
import time
import types
from typing import Any

from tests.integrations.sglang.families import AUX_ROWS, PAGE_SIZE, PAGES, Pools

TERMINAL = ("Success", "Failed")
__all__ = ["PAGES", "PAGE_SIZE", "TERMINAL", "SchedulerRank"]


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
        family: str = "mha",
        pp: tuple[int, int] = (0, 1),
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
        self.pools = Pools(family, (rank, size), pp)
        if role == "prefill":
            self.pools.fill()
        self.meta = MetadataBuffers(AUX_ROWS, 16, torch.float32, 16)
        args = self.classes[KVClassType.KVARGS]()
        args.engine_rank = rank
        self.pools.fill_kv_args(args)
        args.kv_cache_dtype_str = "auto"
        args.page_size = PAGE_SIZE
        args.pp_rank, args.system_dp_rank = pp[0], 0
        args.aux_data_ptrs, args.aux_data_lens, args.aux_item_lens = self.meta.get_buf_infos()
        args.ib_device, args.gpu_id = None, 0
        server_args = types.SimpleNamespace(
            tp_size=size,
            dp_size=1,
            pp_size=pp[1],
            host="127.0.0.1",
            port=self._serve_generate() if role == "prefill" and rank == 0 else None,
            disaggregation_bootstrap_port=bootstrap_port,
        )
        if pp[1] > 1:  # no model on disk here: SGLang's ModelConfig says what its config.json would
            from sglang.srt.configs.model_config import ModelConfig

            config = types.SimpleNamespace(num_hidden_layers=self.pools.layers)
            ModelConfig.from_server_args = staticmethod(lambda server_args, **kw: config)
        mode = DisaggregationMode.PREFILL if role == "prefill" else DisaggregationMode.DECODE
        self.mgr = self.classes[KVClassType.MANAGER](args, mode, server_args, family == "mla")
        return type(self.mgr).__module__ + "." + type(self.mgr).__name__

    def _serve_generate(self) -> int:
        """This prefill's HTTP API, as far as SGLang's PD rebootstrap uses it: ``POST /generate``.

        Each call's JSON is recorded (:meth:`generated`) and then served as prefill's
        scheduler would: a sender for its ``bootstrap_room``, polled to WaitingForInput,
        its pages sent (pages ``1..n`` for ``n = len(input_ids) / PAGE_SIZE``).  A
        ``rid`` starting with ``refuse`` is answered 503 instead.
        """
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        rank = self
        self.generate_calls: list[dict[str, Any]] = []

        class Generate(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                rank.generate_calls.append({"path": self.path, **payload})
                refused = str(payload["rid"]).startswith("refuse")
                status, body = (503, "no capacity") if refused else (200, "{}")
                if not refused:
                    rank._recompute(payload)
                self.send_response(status)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Generate)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return int(server.server_address[1])

    def _recompute(self, payload: dict[str, Any]) -> None:
        """Prefill's side of a rebootstrap: the room's KV sent again (polls without collectives)."""
        from sglang.srt.disaggregation.base.conn import KVPoll

        room = int(payload["bootstrap_room"])
        self.sender(room)
        tx, end = self.requests[room], time.monotonic() + 30
        while tx.poll() == KVPoll.Bootstrapping and time.monotonic() < end:
            time.sleep(0.005)
        pages = len(payload["input_ids"]) // PAGE_SIZE
        self.begin(room, pages * PAGE_SIZE, 2)
        self.chunk(room, list(range(1, 1 + pages)), True)

    def generated(self) -> list[dict[str, Any]]:
        """Every ``POST /generate`` this prefill's HTTP API got, oldest first."""
        return list(self.generate_calls)

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

    def chunk(self, room: int, pages: list[int], last: bool, slot: int | None = None) -> bool:
        """One chunk the way SGLang's ``send_kv_chunk`` does it; False if it was skipped.

        ``slot``: the request's mamba state slot, sent with the last chunk as SGLang's
        ``_mamba_payload`` gives it (one list per ``KVArgs.state_types`` entry).
        """
        import numpy as np

        tx = self.requests[room]
        if not tx.should_send_kv_chunk(len(pages), last):
            return False
        state = self._state_indices(slot) if last else None
        tx.send(np.asarray(pages, dtype=np.int32), state, num_kv_tokens=len(pages) * PAGE_SIZE)
        return True

    def _state_indices(self, slot: int | None) -> list[Any] | None:
        import numpy as np

        if slot is None or not self.mgr.kv_args.state_types:
            return None
        return [[np.asarray([slot], dtype=np.int64)]]

    def posted(self, room: int) -> int:
        """Bytes this prefill rank's WRITEs for the room moved (before ``clear``)."""
        plan = self.mgr.kv.side.send_plans.get(room)
        return int(plan.bytes_posted) if plan is not None else -1

    def metric(self, room: int) -> dict[str, Any]:
        m = self.requests[room].get_transfer_metric()
        return {"latency": m.transfer_latency_s, "bytes": m.transfer_total_bytes}

    # -- decode ------------------------------------------------------------------

    def receiver(
        self, room: int, addr: str, dst: list[int], aux: int, prefix_tokens: int = 0, slot: int | None = None
    ) -> None:
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
        state = self._state_indices(slot)
        rx.send_metadata(np.asarray(dst, dtype=np.int32), aux, state, decode_prefix_len=prefix_tokens)
        self.requests[room] = rx

    def rebootstrap(self, room: int, addr: str, dst: list[int], aux: int, tokens: int, rid: str) -> None:
        """A retracted request coming back (SGLang's PD rebootstrap, allocation policy "early").

        A new receiver for the same room sends its page list, then SGLang's own
        ``DecodePreallocQueue._submit_prefill_recompute`` asks the manager to have
        prefill recompute it, with the payload ``Req.build_rebootstrap_payload`` builds.
        """
        from sglang.srt.disaggregation.decode import DecodePreallocQueue, DecodeRequest
        from sglang.srt.managers.schedule_batch import Req

        self.receiver(room, addr, dst, aux)
        sampling = types.SimpleNamespace(
            temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0, frequency_penalty=0.0, presence_penalty=0.0,
            repetition_penalty=1.0, ignore_eos=False, skip_special_tokens=True,
            spaces_between_special_tokens=True, no_stop_trim=False,
        )  # fmt: skip
        host, port = addr.rsplit(":", 1)
        req = types.SimpleNamespace(
            rid=rid, origin_input_ids=list(range(tokens - 1)), output_ids=[7], sampling_params=sampling,
            bootstrap_host=host, bootstrap_port=int(port), bootstrap_room=room, priority=None,
            extra_key=None, cache_salt=None, routing_key=None, disagg_prefill_dp_rank=None,
        )  # fmt: skip
        req.build_rebootstrap_payload = types.MethodType(Req.build_rebootstrap_payload, req)
        queue = DecodePreallocQueue.__new__(DecodePreallocQueue)
        queue.kv_manager = self.mgr
        decode_req = DecodeRequest(req=req, kv_receiver=self.requests[room], is_rebootstrap=True)
        queue._submit_prefill_recompute(decode_req)

    def query_dp_ranks(self, addr: str, rooms: list[int]) -> dict[str, Any]:
        """SGLang's decode-side DP-rank lookup, on the manager's thread pool as its decode runs it.

        ``DecodePreallocQueue.prefetch_prefill_dp_rank_queries`` (for a prefill that
        says it has two DP ranks), then the answer of the future it submitted.
        """
        from sglang.srt.disaggregation.decode import DecodePreallocQueue

        info = self.mgr.prefill_info_table[addr]
        info.dp_size = 2  # what a DP prefill publishes; its rooms' ranks must then be asked for
        queue = DecodePreallocQueue.__new__(DecodePreallocQueue)
        queue.kv_manager = self.mgr
        queue._prefill_dp_rank_queries = {}
        queue.pending_reqs = [
            types.SimpleNamespace(
                req=types.SimpleNamespace(
                    bootstrap_host=addr.rsplit(":", 1)[0],
                    bootstrap_port=int(addr.rsplit(":", 1)[1]),
                    bootstrap_room=room,
                    disagg_prefill_dp_rank=None,
                )
            )
            for room in rooms
        ]
        queue.prefetch_prefill_dp_rank_queries()
        _, future = queue._prefill_dp_rank_queries[addr]
        return dict(future.result(timeout=30))

    def register_rooms_dp_rank(self, room: int) -> None:
        """A sender on a prefill that says it has two DP ranks: it registers the room's rank."""
        self.mgr.dp_size = 2
        try:
            self.sender(room)
        finally:
            self.mgr.dp_size = 1

    def holds(self, dst: list[int], src: list[int]) -> bool:
        """Decode pages ``dst`` hold prefill pages ``src`` for every head of every KV buffer."""
        return not self.pools.holds(dst, src)

    def state_holds(self, dst: int, src: int) -> list[str]:
        """State tensors whose slot ``dst`` differs from prefill's slot ``src`` (empty: all landed)."""
        return self.pools.state_holds(dst, src)

    def state_zero(self, slot: int) -> bool:
        return self.pools.state_zero(slot)

    def untouched(self, pages: list[int]) -> bool:
        return all(
            bool((t[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] == 0).all())
            for _, _, t, _ in self.pools.kv
            for p in pages
        )

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
