"""``transfer.py --model NAME``: a model preset through kvroom versus raw NIXL doing the same WRITEs.

One prefill and one decode process (TP 1 each), each with the
preset's buffers as torch tensors registered as regions.  kvroom moves
``rooms`` requests of ``pages`` pages in ``chunks`` chunks, with each room's
aux row and (qwen3-next, gpt-oss-20b) its state rows in the last chunk.  The
raw NIXL script posts exactly the descriptor lists the planner gives for the
same chunks (one WRITE per chunk and memory-kind pair, with a notification) and
decode counts the notifications; no rooms, no protocol.  Timing starts when
every room could send and stops when prefill sees every room done (both
schedulers wait on an observer's event, as in ``transfer.py``).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Workload:
    """``rooms`` requests of ``pages`` pages of preset ``model``, in ``chunks`` chunks, TP m -> n."""

    model: str
    rooms: int
    pages: int
    chunks: int
    tp: tuple[int, int] = (1, 1)
    env: tuple[tuple[str, str], ...] = ()

    def page_lists(self, seed: int) -> list[np.ndarray]:
        """Each room's pages: runs of 4 in shuffled order over the pool."""
        rng = np.random.default_rng(seed)
        total = self.rooms * self.pages
        runs = np.arange(total).reshape(-1, 4)[rng.permutation(total // 4)]
        return [r.astype(np.int64) for r in runs.reshape(self.rooms, self.pages)]

    def state(self, room: int, pages: np.ndarray, spaces: frozenset[str]) -> dict[str, list[int]]:
        """The room's state rows: its mamba row, its last 8 pages as sliding-window pages."""
        rows = {"mamba": [room], "swa": pages[-8:].tolist()}
        return {k: v for k, v in rows.items() if k in spaces}


def _setup(w: Workload, role: str, tp_rank: int) -> tuple[Any, Any]:
    import os

    from kvroom.demo.nodes import die_with_parent
    from kvroom.planning import RankRegions
    from kvroom.presets import get_preset

    die_with_parent()
    os.environ.update(dict(w.env))
    preset = get_preset(w.model)
    size = w.tp[0] if role == "prefill" else w.tp[1]
    rank = preset.rank(tp_rank, size)
    pool, tensors = preset.pool(rank, w.rooms * w.pages, w.rooms)
    if role == "prefill":
        for group in tensors.values():
            for t in group.values():
                t.view(-1).view(t.dtype).copy_(t.view(-1).clone().random_(0, 100))
    return RankRegions(rank, pool), tensors


def _spaces(regions: Any) -> frozenset[str]:
    return frozenset(regions.spaces - {"kv", "aux"})


def kvroom_prefill(conn: Connection, w: Workload, tp_rank: int) -> None:
    """One prefill rank through kvroom."""
    from transfer import Finished  # the scheduler's wake-up: an observer, not a polling tick

    from kvroom import KVManager, KVPoll, KVSender

    regions, _tensors = _setup(w, "prefill", tp_rank)
    finished = Finished(w.rooms)
    manager = KVManager("prefill", regions, observer=finished, audit=False)
    conn.send(manager.bootstrap_addr)
    conn.recv()  # decode sent every page list
    src = w.page_lists(1)
    senders = [KVSender(manager, None, room) for room in range(w.rooms)]
    while not all(s.poll() is KVPoll.WaitingForInput for s in senders):
        time.sleep(0.001)
    for room, s in enumerate(senders):
        s.init(w.pages, aux_index=room)
    step, spaces = w.pages // w.chunks, _spaces(regions)
    start = time.perf_counter()
    for c in range(w.chunks):
        for room, s in enumerate(senders):
            last = c == w.chunks - 1
            state = w.state(room, src[room], spaces) if last and spaces else None
            s.send(src[room][c * step : (c + 1) * step], state_indices=state)
    finished.done.wait()
    elapsed = time.perf_counter() - start
    assert all(s.poll() is KVPoll.Success for s in senders)
    conn.send(elapsed)
    conn.recv()
    manager.close()


def kvroom_decode(conn: Connection, w: Workload, tp_rank: int, addrs: list[str]) -> None:
    """One decode rank through kvroom."""
    from transfer import Finished

    from kvroom import KVManager, KVPoll, KVReceiver

    regions, _tensors = _setup(w, "decode", tp_rank)
    finished = Finished(w.rooms)
    manager = KVManager("decode", regions, observer=finished, audit=False)
    dst, spaces = w.page_lists(2), _spaces(regions)
    receivers = []
    for room in range(w.rooms):
        rx = KVReceiver(manager, addrs, room)
        rx.init()
        state = w.state(room, dst[room], spaces) if spaces else None
        rx.send_metadata(dst[room], aux_index=room, state_indices=state)
        receivers.append(rx)
    conn.send("ready")
    finished.done.wait()
    assert all(r.poll() is KVPoll.Success for r in receivers)
    conn.send("done")
    conn.recv()
    manager.close()


def _agent(name: str, regions: Any) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    for mem in {r.mem for r in regions.pool}:
        agent.register_memory([(r.addr, r.length, r.device, "") for r in regions.pool if r.mem == mem], mem)
    return agent


def raw_prefill(conn: Connection, w: Workload) -> None:
    """The same WRITEs from a bare NIXL agent (TP 1 -> 1)."""
    from kvroom.planning import RankRegions, align_chunk, route, stage_entries

    mine, _tensors = _setup(w, "prefill", 0)
    agent = _agent("raw-prefill", mine)
    conn.send(agent.get_agent_metadata())
    peer_md, theirs_dict = conn.recv()
    theirs = RankRegions.from_dict(theirs_dict)
    peer = agent.add_remote_agent(peer_md)
    src, dst, spaces = w.page_lists(1), w.page_lists(2), _spaces(mine)
    step = w.pages // w.chunks

    pair = route(mine, theirs, stage_entries(theirs.layout, mine.layout))  # kvroom: at the handshake

    def plans() -> Any:
        for c in range(w.chunks):
            for room in range(w.rooms):
                last = c == w.chunks - 1
                theirs_state = w.state(room, dst[room], spaces)
                state = {k: (v, theirs_state[k]) for k, v in w.state(room, src[room], spaces).items()}
                idx = align_chunk(
                    src[room][c * step : (c + 1) * step], c * step, dst[room], 0,
                    last=last, state=state, aux=(room, room),
                )  # fmt: skip
                yield room, c, pair.writes(idx)

    conn.send(sum(len(p.parts) for _, _, p in plans() if p is not None))
    conn.recv()
    start = time.perf_counter()
    handles = []
    for room, c, plan in plans():
        for k, part in enumerate(plan.parts if plan is not None else ()):
            local = agent.get_xfer_descs(part.local, part.local_mem)
            remote = agent.get_xfer_descs(part.remote, part.remote_mem)
            handle = agent.initialize_xfer("WRITE", local, remote, peer, f"{room}:{c}:{k}".encode())
            agent.transfer(handle)
            handles.append(handle)
    pending = handles
    while pending:
        still = []
        for h in pending:
            if agent.check_xfer_state(h) == "DONE":
                agent.release_xfer_handle(h)
            else:
                still.append(h)
        pending = still
    conn.send(time.perf_counter() - start)
    conn.recv()


def raw_decode(conn: Connection, w: Workload) -> None:
    """Counts the raw WRITEs' notifications."""
    mine, _tensors = _setup(w, "decode", 0)
    agent = _agent("raw-decode", mine)
    agent.add_remote_agent(conn.recv())
    conn.send((agent.get_agent_metadata(), mine.to_dict()))
    want = conn.recv()
    got = 0
    while got < want:  # polled every millisecond, as kvroom's worker polls while busy (2 cores)
        got += sum(len(v) for v in agent.get_new_notifs().values())
        time.sleep(0.001)
    conn.send("done")
    conn.recv()


def run_kvroom(w: Workload) -> float:
    """kvroom with TP m -> n: every rank its own process."""
    ctx = mp.get_context("spawn")
    m, n = w.tp
    pre = [ctx.Pipe() for _ in range(m)]
    procs = [ctx.Process(target=kvroom_prefill, args=(pre[i][1], w, i), daemon=True) for i in range(m)]
    for p in procs:
        p.start()
    addrs = [c.recv() for c, _ in pre]
    dec = [ctx.Pipe() for _ in range(n)]
    dprocs = [ctx.Process(target=kvroom_decode, args=(dec[i][1], w, i, addrs), daemon=True) for i in range(n)]
    for p in dprocs:
        p.start()
    for c, _ in dec:
        c.recv()
    for c, _ in pre:
        c.send("go")
    elapsed = max(float(c.recv()) for c, _ in pre)
    for c, _ in dec:
        c.recv()
    for (c, _), p in zip(pre + dec, procs + dprocs, strict=True):
        c.send("exit")
        p.join(60)
    return elapsed


def run_raw(w: Workload) -> float:
    """The raw NIXL script (TP 1 -> 1)."""
    ctx = mp.get_context("spawn")
    p_conn, p_child = ctx.Pipe()
    d_conn, d_child = ctx.Pipe()
    prefill = ctx.Process(target=raw_prefill, args=(p_child, w), daemon=True)
    decode = ctx.Process(target=raw_decode, args=(d_child, w), daemon=True)
    prefill.start()
    decode.start()
    d_conn.send(p_conn.recv())
    p_conn.send(d_conn.recv())
    d_conn.send(p_conn.recv())  # how many WRITEs to count
    p_conn.send("go")
    elapsed = float(p_conn.recv())
    d_conn.recv()
    for conn, proc in ((p_conn, prefill), (d_conn, decode)):
        conn.send("exit")
        proc.join(60)
    return elapsed


def bytes_moved(w: Workload) -> int:
    """Bytes one room set moves TP 1 -> 1 (pages, state rows and aux rows), from the planner."""
    from kvroom.planning import align_chunk, route, stage_entries, synthetic_pool
    from kvroom.planning.ranks import RankRegions
    from kvroom.presets import get_preset

    rank = get_preset(w.model).rank()
    items = get_preset(w.model).items(w.rooms * w.pages, w.rooms)
    src = RankRegions(rank, synthetic_pool(rank, items))
    dst = RankRegions(rank, synthetic_pool(rank, items, base=1 << 44))
    pair = route(src, dst, stage_entries(rank, rank))
    spaces = _spaces(src)
    total = 0
    for room, (s, d) in enumerate(zip(w.page_lists(1), w.page_lists(2), strict=True)):
        state = {k: (v, w.state(room, d, spaces)[k]) for k, v in w.state(room, s, spaces).items()}
        plan = pair.writes(align_chunk(s, 0, d, 0, last=True, state=state, aux=(room, room)))
        total += plan.nbytes if plan is not None else 0
    return total


def run(w: Workload, rounds: int) -> dict[str, Any]:
    """Best of ``rounds`` interleaved runs of each; the figures ``transfer.py --model`` prints."""
    kv, raw = float("inf"), float("inf")
    for _ in range(rounds):  # interleaved, so drift hits both alike
        raw = min(raw, run_raw(w))
        kv = min(kv, run_kvroom(w))
    nbytes = bytes_moved(w)
    return {
        "model": w.model,
        "ratio_vs_raw_nixl": raw / kv,
        "kvroom_gbps": nbytes / kv / 1e9,
        "raw_nixl_gbps": nbytes / raw / 1e9,
        "kvroom_s": kv,
        "raw_nixl_s": raw,
        "bytes": nbytes,
        "rooms": w.rooms,
        "pages": w.pages,
        "chunks": w.chunks,
    }
