"""kvroom's SGLang backend versus SGLang's own NIXL backend, both through SGLang's class lookup.

Both backends are taken from ``get_kv_class(TransferBackend(...), KVClassType...)`` after
``load_plugins()`` (kvroom: ``TransferBackend("kvroom")``, the plugin's entry point; SGLang's:
``TransferBackend.NIXL``) and driven the way SGLang's schedulers drive them: the bootstrap
server (in the prefill process), one manager per side made from a ``KVArgs`` filled like
``_init_kv_manager`` (K and V of one layer as CPU tensors, ``kv_data_mem_kinds`` DRAM on both
sides, which SGLang's NIXL backend needs to run on host memory; SGLang's ``MetadataBuffers`` as
aux), prefill senders (``init``, ``send`` chunk by chunk, ``poll``), decode receivers
(``try_ensure_parallel_info``, ``init``, ``send_metadata``, ``poll``), ``clear`` after Success.
Prefill and decode are separate processes on 127.0.0.1 with SGLang's runtime context published
(a local one-layer Llama ``config.json``, no weights); every round starts a fresh pair for each
backend, in turn (kvroom, nixl, kvroom, nixl, ...), so drift hits both alike and no process of
one backend (SGLang's NIXL agents keep a progress thread spinning) runs beside the other's.

Two measurements per round:

* **throughput**: ``--rooms`` rooms (default 256) x ``--pages`` pages (64) x ``--page-kib``
  KiB (64: K and V 32 KiB each) = 1 GiB, ``--chunks`` chunks a room (4), ``--inflight`` rooms
  in flight (32; a scheduler step sends the next chunk of every room in flight, finished rooms
  make room for new ones).  Every room is bootstrapped (prefill WaitingForInput) before the
  clock starts; it stops when both sides saw every room Success.
* **one-room latency**: ``--latency-rooms`` rooms (200) of ``--latency-pages`` pages (64:
  4 MiB), one at a time, 4 chunks each sent back to back; from prefill's first ``send()`` to
  Success as prefill's ``poll()`` sees it and as decode's ``poll()`` sees it (both sides read
  ``time.monotonic()``, one clock on one machine), p50 and p99 over every room of every round.

Both sides poll every ``--poll-us`` microseconds (100) as a scheduler's loop would.  Every byte
is checked: after each measurement decode compares every page of every room with what prefill
wrote there (each 8-byte word of prefill's pool is unique to buffer, page and offset), and the
room's aux row (its id in ``bootstrap_room``); the table says how many pages and bytes passed.
``--burn N`` runs N ``while True: pass`` processes for the whole run (killed after it).
``--pin`` binds prefill to core 0 and decode to core 1 (every thread of each, both backends
alike): unpinned, runs of one setting differ by ~0.6 ms of one-room p50 with where the OS puts
the two processes.

    SGLANG_HOST_IP=127.0.0.1 .venv-sglang/bin/python benchmarks/sglang_backend.py [--quick] [--rounds 3]
        [--burn 2] [--pin] [--json] [--backends kvroom,nixl]

Needs the ``make test-sglang`` environment (``.venv-sglang``: SGLang 0.5.23, nixl, CPU torch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from kvroom.demo.vllm.servers import free_port  # below the ephemeral range: bound after imports

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("kvroom", "nixl")
PAGE_TOKENS, KV_HEADS = 16, 8  # one page of 16 tokens, 8 KV heads, bf16: head_dim from --page-kib
TERMINAL = ("Success", "Failed")


@dataclass(frozen=True)
class Spec:
    """Everything a prefill or decode process needs (picklable)."""

    backend: str
    model_dir: str
    bootstrap_port: int
    rooms: int
    pages: int
    page_bytes: int  # of one page over K and V
    chunks: int
    inflight: int
    latency_rooms: int
    latency_pages: int
    poll_s: float
    pin: bool = False  # prefill on core 0, decode on core 1 (every thread of each)

    @property
    def pool_pages(self) -> int:
        return self.rooms * self.pages

    @property
    def item_bytes(self) -> int:  # one page of one buffer (K or V)
        return self.page_bytes // 2

    @property
    def head_dim(self) -> int:
        return self.item_bytes // (PAGE_TOKENS * KV_HEADS * 2)


def page_lists(rooms: int, pages: int, seed: int) -> list[np.ndarray]:
    """Each room's pages: runs of 8 in shuffled order over the whole pool (as a paged allocator)."""
    rng = np.random.default_rng(seed)
    total = rooms * pages
    runs = np.arange(total).reshape(-1, 8)[rng.permutation(total // 8)]
    return [r.astype(np.int32) for r in runs.reshape(rooms, pages)]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- one scheduler process (prefill or decode) ------------------------------------------


class Side:
    """One SGLang scheduler's transfer backend: its manager, pools, metadata buffers and requests."""

    def __init__(self, role: str, spec: Spec) -> None:
        import torch

        self.role, self.spec = role, spec
        sys.path.insert(0, str(ROOT))
        from tests.integrations.sglang import shim

        shim.install()
        from sglang.srt.plugins import load_plugins

        load_plugins()  # kvroom's entry point: the backend name "kvroom"
        from sglang.srt import runtime_context
        from sglang.srt.disaggregation.utils import (
            DisaggregationMode,
            KVClassType,
            MetadataBuffers,
            TransferBackend,
            get_kv_class,
        )
        from sglang.srt.server_args import ServerArgs

        self.server_args = ServerArgs(
            model_path=spec.model_dir,
            skip_tokenizer_init=True,
            device="cpu",
            host="127.0.0.1",
            disaggregation_mode=role,
            disaggregation_transfer_backend=spec.backend,
            disaggregation_bootstrap_port=spec.bootstrap_port,
        )
        runtime_context.publish(
            self.server_args, role="scheduler", ranks=runtime_context.SpawnRanks(world_rank=0, gpu_id=0)
        )
        runtime_context.get_parallel().override_permanently(pp_group=None)  # no process groups here
        backend = TransferBackend(spec.backend)
        self.classes = {t: get_kv_class(backend, t) for t in KVClassType}
        self.words = spec.item_bytes // 8
        # K and V of one layer; every 8-byte word of prefill's pool is unique (buffer, page, offset)
        self.bufs = [torch.zeros(spec.pool_pages, self.words, dtype=torch.int64) for _ in range(2)]
        if role == "prefill":
            for b, t in enumerate(self.bufs):
                torch.arange(b * t.numel(), (b + 1) * t.numel(), out=t.view(-1))
            server = self.classes[KVClassType.BOOTSTRAP_SERVER]
            self.bootstrap = server(host="127.0.0.1", port=spec.bootstrap_port)
        self.meta = MetadataBuffers(max(spec.rooms, 8), 16, torch.float32, 16)
        args = self._kv_args(self.classes[KVClassType.KVARGS]())
        mode = DisaggregationMode.PREFILL if role == "prefill" else DisaggregationMode.DECODE
        self.mgr = self.classes[KVClassType.MANAGER](args, mode, self.server_args, False)
        self.sender_cls = self.classes[KVClassType.SENDER]
        self.receiver_cls = self.classes[KVClassType.RECEIVER]
        self.addr = f"127.0.0.1:{spec.bootstrap_port}"
        self.requests: dict[int, Any] = {}
        self.src = page_lists(spec.rooms, spec.pages, 1)
        self.dst = page_lists(spec.rooms, spec.pages, 2)
        from sglang.srt.disaggregation.base.conn import KVPoll

        states = ("Failed", "Bootstrapping", "WaitingForInput", "Transferring", "Success")
        self.names = {int(getattr(KVPoll, n)): n for n in states}  # either backend's poll(): an int
        self.verified_pages = 0

    def _kv_args(self, args: Any) -> Any:
        """``KVArgs`` as ``_init_kv_manager`` fills it for an MHA model, TP 1, no state, host memory."""
        for name, kind in type(args).__annotations__.items():  # what this pool leaves unset
            setattr(args, name, [] if str(kind).startswith("List") else None)
        args.engine_rank, args.pp_rank, args.system_dp_rank = 0, 0, 0
        args.kv_cache_dtype_str = "auto"
        args.kv_data_ptrs = [t.data_ptr() for t in self.bufs]
        args.kv_data_lens = [t.nbytes for t in self.bufs]
        args.kv_item_lens = [self.spec.item_bytes] * 2
        args.kv_data_mem_kinds = ["DRAM"] * 2  # SGLang's NIXL backend assumes VRAM otherwise
        args.num_draft_entries = 0
        args.prefill_start_layer, args.prefill_end_layer = 0, 1
        args.kv_head_num, args.total_kv_head_num = KV_HEADS, KV_HEADS
        args.page_size = PAGE_TOKENS
        args.aux_data_ptrs, args.aux_data_lens, args.aux_item_lens = self.meta.get_buf_infos()
        args.ib_device, args.gpu_id = None, 0
        args.is_hybrid_mla_backend = False
        args.kv_buf_groups, args.hidden_kv_layers = 1, 1
        return args

    def _poll(self, room: int) -> str:
        return self.names[int(self.requests[room].poll())]

    def _wait(self, rooms: list[int], want: str, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while not all(self._poll(r) in (want, *TERMINAL) for r in rooms):
            if time.monotonic() > end:
                raise TimeoutError(f"{self.role}: rooms never reached {want}")
            time.sleep(self.spec.poll_s)
        bad = [r for r in rooms if self._poll(r) != want]
        if bad:
            raise RuntimeError(f"{self.role}: rooms {bad[:4]} {self._poll(bad[0])} before {want}")

    # -- prefill ---------------------------------------------------------------

    def senders(self, rooms: list[int]) -> str:
        for room in rooms:
            self.requests[room] = self.sender_cls(self.mgr, self.addr, room)
        return "ok"

    def _begin(self, room: int, index: int, pages: int) -> None:
        """The forward pass wrote the room's first output token row; ``init`` with its pages."""
        aux = index % self.meta.bootstrap_room.shape[0]
        self.meta.bootstrap_room[aux][0] = room
        self.meta.output_ids[aux][0] = room % 1000 + 1
        self.requests[room].init(pages, aux)

    def throughput(self, rooms: list[int]) -> dict[str, Any]:
        """Prefill: every room bootstrapped, then the chunks of ``inflight`` rooms at a time."""
        spec = self.spec
        self._wait(rooms, "WaitingForInput")
        step = spec.pages // spec.chunks
        pending = deque(enumerate(rooms))
        active: list[tuple[int, int]] = []
        sent: dict[int, int] = {}
        done: dict[int, float] = {}
        start = time.monotonic()
        while pending or active:
            while pending and len(active) < spec.inflight:
                i, room = pending.popleft()
                self._begin(room, i, spec.pages)
                sent[room] = 0
                active.append((i, room))
            posted = False
            for i, room in active:  # one scheduler step: the next chunk of every room in flight
                c = sent[room]
                if c < spec.chunks:
                    self.requests[room].send(self.src[i][c * step : (c + 1) * step])
                    sent[room] = c + 1
                    posted = True
            still = []
            for i, room in active:
                state = self._poll(room)
                if state == "Success":
                    done[room] = time.monotonic()
                elif state == "Failed":
                    raise RuntimeError(f"prefill: room {room} failed")
                else:
                    still.append((i, room))
            active = still
            if not posted and active:
                time.sleep(spec.poll_s)
        for room in rooms:
            self.requests.pop(room).clear()
        return {"start": start, "end": max(done.values())}

    def latency_send(self, room: int, index: int) -> dict[str, float]:
        """Prefill: one room's chunks back to back, then poll to Success."""
        spec = self.spec
        self._wait([room], "WaitingForInput")
        tx = self.requests[room]
        self._begin(room, index, spec.latency_pages)
        src = self.src[index % spec.rooms][: spec.latency_pages]
        step = spec.latency_pages // spec.chunks
        start = time.monotonic()
        for c in range(spec.chunks):
            tx.send(src[c * step : (c + 1) * step])
        while (state := self._poll(room)) not in TERMINAL:
            time.sleep(spec.poll_s)
        end = time.monotonic()
        if state != "Success":
            raise RuntimeError(f"prefill: room {room} {state}")
        self.requests.pop(room).clear()
        return {"start": start, "end": end}

    # -- decode ----------------------------------------------------------------

    def _receiver(self, room: int, index: int, pages: np.ndarray) -> None:
        end = time.monotonic() + 60
        while not self.mgr.try_ensure_parallel_info(self.addr):
            if time.monotonic() > end:
                raise TimeoutError("prefill never registered with the bootstrap server")
            time.sleep(0.05)
        aux = index % self.meta.bootstrap_room.shape[0]
        self.meta.bootstrap_room[aux][0] = 0
        rx = self.receiver_cls(mgr=self.mgr, bootstrap_addr=self.addr, bootstrap_room=room)
        rx.init(0)
        rx.send_metadata(pages, aux, None, decode_prefix_len=0)
        self.requests[room] = rx

    def _verify(self, items: list[tuple[int, int, int]]) -> None:
        """Decode: (room, index, pages) each hold what prefill wrote to its source pages, aux row too."""
        import torch

        spec = self.spec
        cols = torch.arange(self.words, dtype=torch.int64)
        for room, index, pages in items:
            src = torch.from_numpy(self.src[index % spec.rooms][:pages].astype(np.int64))
            dst = torch.from_numpy(self.dst[index % spec.rooms][:pages].astype(np.int64))
            for b, t in enumerate(self.bufs):
                want = (b * spec.pool_pages + src).view(-1, 1) * self.words + cols
                if not torch.equal(t[dst], want):
                    raise AssertionError(f"decode: room {room} buffer {b}: pages differ from prefill's")
            aux = index % self.meta.bootstrap_room.shape[0]
            if int(self.meta.bootstrap_room[aux][0]) != room:
                raise AssertionError(f"decode: room {room}: aux row {aux} holds another room")
            self.verified_pages += pages

    def receive(self, conn: Connection, rooms: list[int]) -> dict[str, Any]:
        """Decode: every room's page list sent; poll all until Success (one sweep a scheduler step)."""
        for i, room in enumerate(rooms):
            self._receiver(room, i, self.dst[i])
        conn.send("opened")
        left = set(rooms)
        done: dict[int, float] = {}
        while left:
            for room in list(left):
                state = self._poll(room)
                if state == "Success":
                    done[room] = time.monotonic()
                    left.discard(room)
                elif state == "Failed":
                    raise RuntimeError(f"decode: room {room} failed")
            if left:
                time.sleep(self.spec.poll_s)
        for room in rooms:
            self.requests.pop(room).clear()
        before = self.verified_pages
        self._verify([(room, i, self.spec.pages) for i, room in enumerate(rooms)])
        return {"end": max(done.values()), "verified_pages": self.verified_pages - before}

    def latency_recv(self, conn: Connection, room: int, index: int) -> dict[str, Any]:
        """Decode: zero the room's pages, send its page list, poll until Success, check it."""
        dst = self.dst[index % self.spec.rooms][: self.spec.latency_pages]
        for t in self.bufs:
            t[dst] = 0
        self._receiver(room, index, dst)
        conn.send("opened")
        while (state := self._poll(room)) not in TERMINAL:
            time.sleep(self.spec.poll_s)
        end = time.monotonic()
        if state != "Success":
            raise RuntimeError(f"decode: room {room} {state}")
        self.requests.pop(room).clear()
        self._verify([(room, index, self.spec.latency_pages)])
        return {"end": end}


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the driver dies (no orphans, burners included)."""
    import ctypes

    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(1)


def side_main(conn: Connection, role: str, spec: Spec) -> None:
    """A scheduler process: build the side, then answer the driver's calls until ``exit``."""
    die_with_parent()
    if spec.pin:  # before any thread starts: each inherits it
        os.sched_setaffinity(0, {0 if role == "prefill" else 1})
    os.dup2(2, 1)  # NIXL and SGLang log to stdout: keep the driver's stdout for the table or JSON
    os.environ["SGLANG_HOST_IP"] = "127.0.0.1"
    try:
        side = Side(role, spec)
        conn.send(("ok", None))
        while True:
            method, args = conn.recv()
            if method == "exit":
                break
            if method in ("receive", "latency_recv"):
                result = getattr(side, method)(conn, *args)
            else:
                result = getattr(side, method)(*args)
            conn.send(("ok", result))
    except BaseException as exc:  # the driver reports it and kills both sides
        import traceback

        traceback.print_exc()
        conn.send(("error", f"{role}: {type(exc).__name__}: {exc}"))
    finally:
        os._exit(0)  # SGLang's bootstrap and NIXL threads are not daemons


# -- driver ---------------------------------------------------------------------------------


class Peer:
    """The driver's end of one side process."""

    def __init__(self, role: str, spec: Spec) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.role = role
        self.proc = ctx.Process(target=side_main, args=(child, role, spec), daemon=True)
        self.proc.start()

    def result(self, timeout: float = 300.0) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.role} did not answer in {timeout:.0f} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def call(self, method: str, *args: Any, timeout: float = 300.0) -> Any:
        self.conn.send((method, args))
        return self.result(timeout)

    def post(self, method: str, *args: Any) -> None:
        self.conn.send((method, args))

    def opened(self) -> None:
        if not self.conn.poll(60):
            raise TimeoutError(f"{self.role} did not open its rooms")
        got = self.conn.recv()
        if got != "opened":
            raise RuntimeError(got[1] if isinstance(got, tuple) else got)

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("exit", ()))
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def run_round(spec: Spec, first_room: int) -> dict[str, Any]:
    """One backend, fresh prefill and decode processes: throughput, then one-room latency."""
    prefill = Peer("prefill", spec)
    decode: Peer | None = None
    try:
        prefill.result()  # prefill's manager registered with its bootstrap server
        decode = Peer("decode", spec)
        decode.result()
        rooms = list(range(first_room, first_room + spec.rooms))
        prefill.call("senders", rooms)
        decode.post("receive", rooms)
        decode.opened()
        tp = prefill.call("throughput", rooms)
        dec = decode.result()
        seconds = max(tp["end"], dec["end"]) - tp["start"]
        out: dict[str, Any] = {
            "throughput_s": seconds,
            "throughput_gbps": spec.rooms * spec.pages * spec.page_bytes / seconds / 1e9,
            "prefill_s": tp["end"] - tp["start"],
            "verified_pages": dec["verified_pages"],
            "prefill_ms": [],
            "decode_ms": [],
        }
        base = first_room + spec.rooms
        for i in range(spec.latency_rooms):
            room = base + i
            prefill.call("senders", [room])
            decode.post("latency_recv", room, i)
            decode.opened()
            sent = prefill.call("latency_send", room, i)
            got = decode.result()
            out["prefill_ms"].append(1000 * (sent["end"] - sent["start"]))
            out["decode_ms"].append(1000 * (got["end"] - sent["start"]))
        out["verified_pages"] += spec.latency_rooms * spec.latency_pages
        return out
    finally:
        for peer in (decode, prefill):
            if peer is not None:
                peer.close()


def write_model(path: str, spec: Spec) -> None:
    """A one-layer Llama ``config.json`` (no weights): what SGLang's ``ServerArgs`` resolves."""
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=KV_HEADS * spec.head_dim,
        intermediate_size=2 * KV_HEADS * spec.head_dim,
        num_hidden_layers=1,
        num_attention_heads=KV_HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=spec.head_dim,
        vocab_size=1024,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(path)


class Burners:
    """``n`` CPU-burning processes, each in its own process group, killed on exit."""

    def __init__(self, n: int) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", "while True: pass"], start_new_session=True, preexec_fn=die_with_parent
            )
            for _ in range(n)
        ]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def summarise(spec: Spec, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    gbps = [r["throughput_gbps"] for r in rounds]
    pre = [x for r in rounds for x in r["prefill_ms"]]
    dec = [x for r in rounds for x in r["decode_ms"]]
    return {
        "throughput_gbps_best": max(gbps),
        "throughput_gbps_median": statistics.median(gbps),
        "throughput_gbps_rounds": gbps,
        "latency_prefill_ms_p50": _pct(pre, 0.5),
        "latency_prefill_ms_p99": _pct(pre, 0.99),
        "latency_decode_ms_p50": _pct(dec, 0.5),
        "latency_decode_ms_p99": _pct(dec, 0.99),
        "latency_rooms": len(pre),
        "verified_pages": sum(r["verified_pages"] for r in rounds),
        "verified_bytes": sum(r["verified_pages"] for r in rounds) * spec.page_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 round, 32 rooms, 50 latency rooms")
    parser.add_argument("--rounds", type=int, help="rounds of each backend (default 3)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--rooms", type=int, help="throughput rooms (default 256)")
    parser.add_argument("--pages", type=int, default=64)
    parser.add_argument("--page-kib", type=int, default=64, help="one page over K and V")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--inflight", type=int, default=32, help="throughput rooms in flight")
    parser.add_argument("--latency-rooms", type=int, help="one-room latency samples a round (200)")
    parser.add_argument("--latency-pages", type=int, default=64)
    parser.add_argument("--poll-us", type=float, default=100.0, help="scheduler polling interval")
    parser.add_argument("--burn", type=int, default=0, help="CPU-burning processes beside the run")
    parser.add_argument("--pin", action="store_true", help="prefill on core 0, decode on core 1")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    backends = [b for b in args.backends.split(",") if b]
    if any(b not in BACKENDS for b in backends):
        parser.error(f"--backends: one or more of {BACKENDS}")
    if args.pages % 8 or args.pages % args.chunks or args.latency_pages % args.chunks:
        parser.error("--pages must be a multiple of 8 and of --chunks, --latency-pages of --chunks")
    if args.latency_pages > args.pages:
        parser.error("--latency-pages must be at most --pages")
    results: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: kill the children
    burners = Burners(args.burn)
    load_before = os.getloadavg()
    started = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="kvroom-sglang-bench-") as model_dir:
            base = Spec(
                backend="kvroom",
                model_dir=model_dir,
                bootstrap_port=0,
                rooms=args.rooms or (32 if args.quick else 256),
                pages=args.pages,
                page_bytes=args.page_kib << 10,
                chunks=args.chunks,
                inflight=args.inflight,
                latency_rooms=args.latency_rooms or (50 if args.quick else 200),
                latency_pages=args.latency_pages,
                poll_s=args.poll_us / 1e6,
                pin=args.pin,
            )
            write_model(model_dir, base)
            first = 1000
            for r in range(rounds):
                for backend in backends:
                    spec = Spec(**{**asdict(base), "backend": backend, "bootstrap_port": free_port()})
                    results[backend].append(run_round(spec, first))
                    first += 100_000
                    if not args.json:
                        last = results[backend][-1]
                        print(
                            f"round {r + 1} {backend}: {last['throughput_gbps']:.2f} GB/s, one room p50 "
                            f"{_pct(last['prefill_ms'], 0.5):.2f} / {_pct(last['decode_ms'], 0.5):.2f} ms",
                            file=sys.stderr,
                        )
    finally:
        burners.stop()
    summary = {b: summarise(base, results[b]) for b in backends}
    out: dict[str, Any] = {
        "workload": {
            "throughput": f"{base.rooms} rooms x {base.pages} pages x {args.page_kib} KiB, "
            f"{base.chunks} chunks a room, {base.inflight} in flight",
            "latency": f"{base.latency_rooms} rooms a round x {base.latency_pages} pages x "
            f"{args.page_kib} KiB, {base.chunks} chunks, one at a time",
            "throughput_bytes": base.rooms * base.pages * base.page_bytes,
            "latency_room_bytes": base.latency_pages * base.page_bytes,
            "rounds": rounds,
            "poll_us": args.poll_us,
            "burn": args.burn,
            "pin": args.pin,
        },
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "wall_s": time.time() - started,
        "backends": summary,
    }
    if "kvroom" in summary and "nixl" in summary:
        k, n = summary["kvroom"], summary["nixl"]
        out["kvroom_vs_nixl"] = {
            "throughput_ratio": k["throughput_gbps_best"] / n["throughput_gbps_best"],
            "latency_at_most_nixl": all(
                k[f"latency_{side}_ms_{q}"] <= n[f"latency_{side}_ms_{q}"]
                for side in ("prefill", "decode")
                for q in ("p50", "p99")
            ),
        }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    w = out["workload"]
    print(f"throughput: {w['throughput']} ({w['throughput_bytes'] / (1 << 30):.2f} GiB), best of {rounds}")
    print(f"one room:   {w['latency']}, send() to Success, every round's rooms")
    print(
        f"{'backend':>8}{'GB/s':>8}{'median':>8}"
        f"{'pre p50':>9}{'pre p99':>9}{'dec p50':>9}{'dec p99':>9}  verified"
    )
    for b, s in summary.items():
        print(
            f"{b:>8}{s['throughput_gbps_best']:>8.2f}{s['throughput_gbps_median']:>8.2f}"
            f"{s['latency_prefill_ms_p50']:>9.2f}{s['latency_prefill_ms_p99']:>9.2f}"
            f"{s['latency_decode_ms_p50']:>9.2f}{s['latency_decode_ms_p99']:>9.2f}"
            f"  {s['verified_pages']} pages, {s['verified_bytes'] / (1 << 20):.0f} MiB"
        )
    if "kvroom_vs_nixl" in out:
        c = out["kvroom_vs_nixl"]
        print(f"kvroom / nixl throughput: {c['throughput_ratio']:.2f}")
        print(f"kvroom p50 and p99 at most nixl's (prefill and decode): {c['latency_at_most_nixl']}")
    print(
        f"load average before / after: {load_before[0]:.2f} / {out['loadavg_after'][0]:.2f}; burn {args.burn}"
        f"; pinned {args.pin}"
    )


if __name__ == "__main__":
    main()
