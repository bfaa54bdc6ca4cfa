"""vLLM's real v1 Scheduler with kvroom's connector on both sides, in one process.

Each engine is vLLM's ``Scheduler`` driven through ``add_request`` / ``schedule`` /
``update_from_output``, with the worker-side connector stepped the way vLLM's model runner
steps it, over vLLM-shaped CPU caches and real NIXL.  After every scenario neither scheduler
nor either connector holds anything for the request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import torch
from vllm.v1.request import RequestStatus

from kvroom.integrations.vllm import BOOTSTRAP_ADDR, ROOM
from tests.integrations.vllm.harness import BLOCK, Engine, kv_caches, model_dir, request, vllm_config

PROMPT = list(range(100, 140))  # 40 tokens: 3 blocks, the last one partial
OTHER = list(range(300, 340))  # another prompt of as many blocks
SOON = 2.5  # "at once": under the 3 s and 10 s deadlines these tests configure, with slack for load


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Callable[..., tuple[Engine, Engine]]]:
    made: list[Engine] = []

    def build(
        policy: str = "fail", deadlines: tuple[float, ...] = (10.0, 10.0, 10.0)
    ) -> tuple[Engine, Engine]:
        model = model_dir(tmp_path / "model")
        caches = kv_caches()
        for name, cache in caches.items():  # prefill's KV: a distinct value per byte position
            flat = cache.permute(0, 2, 1, 3)
            flat.copy_(torch.arange(flat.numel(), dtype=torch.float32).view(flat.shape) + hash(name) % 97)
        prefill = Engine(vllm_config(model, "kv_producer", policy, deadlines=list(deadlines)), caches)
        made.append(prefill)
        decode = Engine(vllm_config(model, "kv_consumer", policy, deadlines=list(deadlines)))
        made.append(decode)
        return prefill, decode

    yield build
    for engine in made:
        engine.close()


def run(engines: list[Engine], until: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < end, "scenario did not settle"
        for engine in engines:
            engine.step()
        time.sleep(0.002)


def jobs(engine: Engine) -> list[Any]:
    """Record every job the engine's scheduler-side connector ships to its worker."""
    seen: list[Any] = []
    sched = engine.connector.scheduler
    assert sched is not None
    build = sched.build_meta

    def recording() -> Any:
        meta = build()
        seen.extend([*meta.sends, *meta.recvs])
        return meta

    sched.build_meta = recording  # type: ignore[method-assign]
    return seen


def quiet(*engines: Engine) -> bool:
    return all(not e.scheduler.has_requests() for e in engines)


def assert_clean(prefill: Engine, decode: Engine, ids: dict[str, str], room: int) -> None:
    assert prefill.held(ids["prefill"], room) == []
    assert decode.held(ids["decode"], room) == []
    for engine in (prefill, decode):
        free = engine.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
        assert free == 63  # every block but vLLM's null block


def test_remote_prefill_completes_with_prefills_bytes(engines: Callable[..., tuple[Engine, Engine]]) -> None:
    prefill, decode = engines()
    sent, received = jobs(prefill), jobs(decode)
    prefill.scheduler.add_request(request("p-1", PROMPT, {"do_remote_decode": True, ROOM: 11}))
    run([prefill], lambda: "p-1" in prefill.outputs)
    params = prefill.outputs["p-1"].kv_transfer_params
    assert params[ROOM] == 11 and params[BOOTSTRAP_ADDR] == [prefill.worker.worker.manager.bootstrap_addr]
    decode.scheduler.add_request(request("d-1", PROMPT, params, max_tokens=3))
    run([prefill, decode], lambda: "d-1" in decode.outputs and quiet(prefill, decode))
    out = decode.outputs["d-1"]
    assert decode.computed["d-1"] < len(PROMPT)  # only the last prompt token and the decode steps
    assert out.finish_reason.name == "LENGTH" and len(decode.outputs["d-1"].new_token_ids) >= 1
    (send,), (recv,) = sent, received
    assert len(send.pages) == len(recv.pages) == 3 and recv.prefix_len == 0
    p_pool, d_pool = prefill.worker.worker.manager.pool, decode.worker.worker.manager.pool
    for layer in range(p_pool.layout.layers):
        assert torch.equal(p_pool.layers[layer][list(send.pages)], d_pool.layers[layer][list(recv.pages)])
    # the connector's stats go through vLLM's own connector stats logging
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging

    logging = KVConnectorLogging(decode.scheduler.vllm_config.kv_transfer_config)
    for data in decode.stats:
        logging.observe(data)
    assert logging.transfer_stats_accumulator is not None
    reduced = logging.transfer_stats_accumulator.reduce()
    assert reduced["rooms_Success"] == 1 and reduced["latency_max_ms"] > 0
    assert reduced["bytes"] == 3 * d_pool.page_bytes * d_pool.layout.layers
    assert_clean(prefill, decode, {"prefill": "p-1", "decode": "d-1"}, 11)


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_failed_receive_follows_the_load_failure_policy(
    engines: Callable[..., tuple[Engine, Engine]], policy: str
) -> None:
    prefill, decode = engines(policy)
    addr = prefill.worker.worker.manager.bootstrap_addr
    # the router dispatched to both at once; prefill's request is then aborted before it runs
    prefill.scheduler.add_request(request("p-2", PROMPT, {"do_remote_decode": True, ROOM: 12}))
    decode.scheduler.add_request(
        request("d-2", PROMPT, {"do_remote_prefill": True, ROOM: 12, BOOTSTRAP_ADDR: addr}, max_tokens=2)
    )
    decode.step()  # decode's room is open: its page list goes to prefill
    started = time.monotonic()
    prefill.scheduler.finish_requests("p-2", RequestStatus.FINISHED_ABORTED)
    run([prefill, decode], lambda: "d-2" in decode.outputs and quiet(prefill, decode))
    assert time.monotonic() - started < SOON  # at once, not at decode's 10 s deadline
    out = decode.outputs["d-2"]
    failures = {k: v for s in decode.stats for k, v in s["failures"].items()}
    assert failures == {"RemoteFailureError": 1}, failures
    if policy == "fail":
        assert out.finish_reason.name == "ERROR"
        assert "d-2" not in decode.computed  # never scheduled: it failed while waiting for KV
    else:  # rescheduled and prefilled locally, the whole prompt: it generated its tokens
        assert out.finish_reason.name == "LENGTH"
        assert decode.computed["d-2"] >= len(PROMPT)
        assert decode.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == 63
    assert_clean(prefill, decode, {"prefill": "p-2", "decode": "d-2"}, 12)


def test_decode_abort_keeps_blocks_until_no_write_can_land(
    engines: Callable[..., tuple[Engine, Engine]],
) -> None:
    prefill, decode = engines(deadlines=(3.0, 3.0, 3.0))
    addr = prefill.worker.worker.manager.bootstrap_addr
    decode.scheduler.add_request(
        request("d-3", PROMPT, {"do_remote_prefill": True, ROOM: 13, BOOTSTRAP_ADDR: addr})
    )
    decode.step()
    pool = decode.scheduler.kv_cache_manager.block_pool
    free = pool.get_num_free_blocks()
    assert free == 63 - 3
    p_side = prefill.worker.worker.manager.side
    run([decode], lambda: 13 in p_side.pending)  # its page list waits on prefill for the room
    decode.scheduler.finish_requests("d-3", RequestStatus.FINISHED_ABORTED)
    assert pool.get_num_free_blocks() == free  # still registered with prefill: held
    run([prefill, decode], lambda: quiet(decode))
    assert pool.get_num_free_blocks() == 63
    failures = {k: v for s in decode.stats for k, v in s["failures"].items()}
    assert failures == {"RoomAbortedError": 1}, failures
    # prefill's request arrives late: decode left while its page list waited, so the room fails as
    # it opens (not at its 3 s Bootstrapping deadline) and prefill's blocks come back
    started = time.monotonic()
    prefill.scheduler.add_request(request("p-3", PROMPT, {"do_remote_decode": True, ROOM: 13}))
    run([prefill], lambda: quiet(prefill), timeout=30)
    assert time.monotonic() - started < SOON
    assert_clean(prefill, decode, {"prefill": "p-3", "decode": "d-3"}, 13)


def test_partial_prefix_hit_receives_only_the_blocks_after_it(
    engines: Callable[..., tuple[Engine, Engine]],
) -> None:
    prefill, decode = engines()
    sent, received = jobs(prefill), jobs(decode)
    # decode computed the first two blocks' prompt before: a local prefix hit of 32 tokens
    decode.scheduler.add_request(request("warm", [*PROMPT[: 2 * BLOCK], 1, 2, 3], None))
    run([decode], lambda: "warm" in decode.outputs and quiet(decode))
    prefill.scheduler.add_request(request("p-4", PROMPT, {"do_remote_decode": True, ROOM: 14}))
    run([prefill], lambda: "p-4" in prefill.outputs)
    decode.scheduler.add_request(request("d-4", PROMPT, prefill.outputs["p-4"].kv_transfer_params))
    run([prefill, decode], lambda: "d-4" in decode.outputs and quiet(prefill, decode))
    assert decode.outputs["d-4"].finish_reason.name == "LENGTH"
    (send,), (recv,) = sent, received
    assert recv.prefix_len == 2 * BLOCK and len(recv.pages) == 1 and len(send.pages) == 3
    p_pool, d_pool = prefill.worker.worker.manager.pool, decode.worker.worker.manager.pool
    for layer in range(p_pool.layout.layers):  # the block after the hit holds prefill's third block
        assert torch.equal(p_pool.layers[layer][send.pages[2]], d_pool.layers[layer][recv.pages[0]])
    moved = 1 * p_pool.page_bytes * p_pool.layout.layers  # one block moved, not the prompt's three
    assert sum(s["bytes"] for s in prefill.stats) == sum(s["bytes"] for s in decode.stats) == moved
    assert_clean(prefill, decode, {"prefill": "p-4", "decode": "d-4"}, 14)


def _no_block_of(prefill: Engine, decode: Engine, send: Any, recv_pages: list[int]) -> None:
    """None of decode's ``recv_pages`` holds any of prefill's blocks of ``send``."""
    p_pool, d_pool = prefill.worker.worker.manager.pool, decode.worker.worker.manager.pool
    for layer in range(p_pool.layout.layers):
        for src in send.pages:
            for dst in recv_pages:
                assert not torch.equal(p_pool.layers[layer][src], d_pool.layers[layer][dst])


def test_a_room_id_its_request_still_holds_is_refused_to_a_second_request(
    engines: Callable[..., tuple[Engine, Engine]],
) -> None:
    """(a) one after the other: B gets no params while A's room waits; A is served, B computes."""
    prefill, decode = engines()
    sent, received = jobs(prefill), jobs(decode)
    pool = prefill.scheduler.kv_cache_manager.block_pool
    prefill.scheduler.add_request(request("p-A", PROMPT, {"do_remote_decode": True, ROOM: 20}))
    run([prefill], lambda: "p-A" in prefill.outputs)
    prefill.scheduler.add_request(request("p-B", OTHER, {"do_remote_decode": True, ROOM: 20}))
    run([prefill], lambda: "p-B" in prefill.outputs)
    assert prefill.outputs["p-B"].kv_transfer_params is None  # told: no room to hand to decode
    assert pool.get_num_free_blocks() == 63 - 3  # B's blocks are back, A's are held for its decode
    assert [j.req_id for j in sent] == ["p-A"]
    decode.scheduler.add_request(request("d-B", OTHER, prefill.outputs["p-B"].kv_transfer_params))
    decode.scheduler.add_request(request("d-A", PROMPT, prefill.outputs["p-A"].kv_transfer_params))
    run([prefill, decode], lambda: {"d-A", "d-B"} <= set(decode.outputs) and quiet(prefill, decode))
    assert decode.outputs["d-A"].finish_reason.name == decode.outputs["d-B"].finish_reason.name == "LENGTH"
    assert decode.computed["d-B"] >= len(OTHER)  # prefilled locally: no remote KV for it
    (recv,) = received
    assert recv.req_id == "d-A"
    assert_clean(prefill, decode, {"prefill": "p-A", "decode": "d-A"}, 20)
    assert prefill.held("p-B", 20) == decode.held("d-B", 20) == []


@pytest.mark.parametrize("first", ["A", "B"])
def test_two_requests_dispatched_at_once_under_one_room_never_swap_kv(
    engines: Callable[..., tuple[Engine, Engine]], first: str
) -> None:
    """(b) at once: both decodes and both prefills under room 21; whichever decode opens it first."""
    prefill, decode = engines()
    sent, received = jobs(prefill), jobs(decode)
    addr = prefill.worker.worker.manager.bootstrap_addr
    remote = {"do_remote_prefill": True, ROOM: 21, BOOTSTRAP_ADDR: addr}
    prompts = {"A": PROMPT, "B": OTHER}
    second = "B" if first == "A" else "A"
    for name in (first, second):
        decode.scheduler.add_request(request(f"d-{name}", prompts[name], remote, max_tokens=2))
        decode.step()
    started = time.monotonic()
    prefill.scheduler.add_request(request("p-A", PROMPT, {"do_remote_decode": True, ROOM: 21}))
    prefill.scheduler.add_request(request("p-B", OTHER, {"do_remote_decode": True, ROOM: 21}))
    run([prefill, decode], lambda: {"d-A", "d-B"} <= set(decode.outputs) and quiet(prefill, decode))
    assert time.monotonic() - started < SOON
    reasons = {n: decode.outputs[f"d-{n}"].finish_reason.name for n in "AB"}
    # the decode that opened the room second is refused by decode itself (a duplicate live room)
    assert reasons[second] == "ERROR"
    # the first is served only if it is the request prefill holds the room for; else both fail
    assert reasons[first] == ("LENGTH" if first == "A" else "ERROR"), reasons
    opened = [j for j in received if j.req_id == f"d-{first}"]
    for job in sent:  # no block of a request reached another request's blocks
        other = [p for j in opened if j.req_id != f"d-{job.req_id[2:]}" for p in j.pages]
        _no_block_of(prefill, decode, job, other)
    for name in "AB":
        assert prefill.held(f"p-{name}", 21) == decode.held(f"d-{name}", 21) == []
    for engine in (prefill, decode):
        assert engine.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == 63


def test_a_request_refused_a_room_id_its_twin_holds_fails_its_later_prefill_room_at_once(
    engines: Callable[..., tuple[Engine, Engine]],
) -> None:
    """(c) decode refuses B the id A holds; prefill serves A, then opens B's room under the id.

    B's decode request is gone (ERROR): prefill's room for B fails as it opens, told apart from
    A's by its fingerprint, instead of holding B's blocks to the Bootstrapping deadline.
    """
    prefill, decode = engines()
    addr = prefill.worker.worker.manager.bootstrap_addr
    remote = {"do_remote_prefill": True, ROOM: 25, BOOTSTRAP_ADDR: addr}
    for name, prompt in (("A", PROMPT), ("B", OTHER)):
        decode.scheduler.add_request(request(f"d-{name}", prompt, remote, max_tokens=2))
        decode.step()
    run([decode], lambda: "d-B" in decode.outputs)
    assert decode.outputs["d-B"].finish_reason.name == "ERROR"  # a duplicate live room id
    prefill.scheduler.add_request(request("p-A", PROMPT, {"do_remote_decode": True, ROOM: 25}))
    run([prefill, decode], lambda: "d-A" in decode.outputs and quiet(prefill, decode))
    assert decode.outputs["d-A"].finish_reason.name == "LENGTH"
    started = time.monotonic()
    prefill.scheduler.add_request(request("p-B", OTHER, {"do_remote_decode": True, ROOM: 25}))
    run([prefill, decode], lambda: "p-B" in prefill.outputs and quiet(prefill, decode))
    assert time.monotonic() - started < SOON  # not the 10 s Bootstrapping deadline
    failures = {k: v for s in prefill.stats for k, v in s["failures"].items()}
    assert failures == {"RemoteFailureError": 1}, failures
    assert_clean(prefill, decode, {"prefill": "p-B", "decode": "d-B"}, 25)
    assert prefill.held("p-A", 25) == decode.held("d-A", 25) == []


def test_a_decode_prompt_other_than_prefills_fails_the_room_on_both_sides_at_once(
    engines: Callable[..., tuple[Engine, Engine]],
) -> None:
    prefill, decode = engines()
    prefill.scheduler.add_request(request("p-5", PROMPT, {"do_remote_decode": True, ROOM: 22}))
    run([prefill], lambda: "p-5" in prefill.outputs)
    started = time.monotonic()
    decode.scheduler.add_request(request("d-5", OTHER, prefill.outputs["p-5"].kv_transfer_params))
    run([prefill, decode], lambda: "d-5" in decode.outputs and quiet(prefill, decode))
    assert time.monotonic() - started < SOON
    assert decode.outputs["d-5"].finish_reason.name == "ERROR"
    failures = {k: v for s in prefill.stats for k, v in s["failures"].items()}
    assert failures == {"RequestMismatchError": 1}, failures
    assert_clean(prefill, decode, {"prefill": "p-5", "decode": "d-5"}, 22)


@pytest.mark.parametrize("greeted", [False, True], ids=["first-contact", "greeted"])
def test_a_decode_request_gone_before_its_room_opened_frees_prefills_room_at_once(
    engines: Callable[..., tuple[Engine, Engine]], greeted: bool
) -> None:
    """Prefill's room waits for decode; decode's request is aborted before vLLM scheduled it."""
    prefill, decode = engines()
    if greeted:  # decode already talks to this prefill: the abort goes out at once
        prefill.scheduler.add_request(request("p-0", OTHER, {"do_remote_decode": True, ROOM: 24}))
        run([prefill], lambda: "p-0" in prefill.outputs)
        decode.scheduler.add_request(request("d-0", OTHER, prefill.outputs["p-0"].kv_transfer_params))
        run([prefill, decode], lambda: "d-0" in decode.outputs and quiet(prefill, decode))
    # else the abort waits for the handshake it started: prefill may hold the room already
    pool = prefill.scheduler.kv_cache_manager.block_pool
    prefill.scheduler.add_request(request("p-6", PROMPT, {"do_remote_decode": True, ROOM: 23}))
    run([prefill], lambda: "p-6" in prefill.outputs)
    assert pool.get_num_free_blocks() == 63 - 3  # held for decode
    started = time.monotonic()
    decode.scheduler.add_request(request("d-6", PROMPT, prefill.outputs["p-6"].kv_transfer_params))
    decode.scheduler.finish_requests("d-6", RequestStatus.FINISHED_ABORTED)  # never scheduled
    run([prefill, decode], lambda: quiet(prefill, decode))
    assert time.monotonic() - started < SOON  # not the 10 s Bootstrapping deadline
    failures = {k: v for s in prefill.stats for k, v in s["failures"].items()}
    assert failures == {"RemoteFailureError": 1}, failures
    assert_clean(prefill, decode, {"prefill": "p-6", "decode": "d-6"}, 23)
