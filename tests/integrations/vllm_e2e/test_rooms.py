"""A room's KV reaches only its request, with real vLLM engines, whatever the router does.

These tests play a careless router against the suite's shared PD pair: they talk to prefill
and decode directly, reuse a room id for two different prompts of equal block count, give
decode another prompt than prefill's, and leave before prefill's room opens.  No request may
return another's tokens; each ends with its own tokens (equal to one engine's) or a clean error
at once (a tenth of kvroom's 30 s deadlines, the wait these cases had before), and afterwards no
engine holds a block (``vllm:kv_cache_usage_perc``), a room or a request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from kvroom.demo.vllm.client import Completion, complete, metric
from kvroom.demo.vllm.model import prompt_ids
from kvroom.integrations.vllm.params import BOOTSTRAP_ADDR, ROOM
from tests.integrations.vllm_e2e.engines import BLOCK, DEADLINES, PD, Reference, run, wait_for

# the shared engines start inside the first test's setup
pytestmark = [pytest.mark.usefixtures("idle_after"), pytest.mark.timeout(900)]

TOKENS = 8
SOON = DEADLINES[0] / 10
A, B = prompt_ids(2 * BLOCK + 10, seed=500), prompt_ids(2 * BLOCK + 20, seed=501)  # 3 blocks each


async def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(url + "/v1/completions", json=body) as resp:
        data = await resp.json(content_type=None)
        return resp.status, data


def _prefill(pd: PD, prompt: list[int], room: int) -> tuple[int, dict[str, Any]]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
            "kv_transfer_params": {"do_remote_decode": True, ROOM: room}}  # fmt: skip
    result: tuple[int, dict[str, Any]] = run(_post(pd.prefill.url, body))
    return result


async def _decode(pd: PD, prompt: list[int], params: dict[str, Any] | None) -> Completion:
    body_params = {"kv_transfer_params": params} if params else {}
    async with aiohttp.ClientSession() as session:
        return await complete(session, pd.decodes[0].url, prompt, TOKENS, stream=False, extra=body_params)


def _addr(pd: PD, reference: Reference) -> list[str]:
    """Prefill's kvroom addresses, as a router learns them from a first answer."""
    status, data = _prefill(pd, prompt_ids(5, seed=1), 7_000_001)
    assert status == 200
    params = data["kv_transfer_params"]
    (c,) = [run(_decode(pd, prompt_ids(5, seed=1), params))]
    assert c.tokens == reference.tokens([prompt_ids(5, seed=1)], TOKENS)[0]
    addr: list[str] = params[BOOTSTRAP_ADDR]
    return addr


def _own_or_error(c: Completion, mine: list[int], other: list[int]) -> None:
    assert c.tokens != other or mine == other, "a request returned another request's tokens"
    if c.ok:
        assert c.tokens == mine
    else:
        assert c.status >= 400 or c.error


def test_a_room_id_reused_while_the_first_room_waits(pd: PD, reference: Reference) -> None:
    """(a) one after the other: prefill refuses B's room (no params); each decode ends right."""
    ref_a, ref_b = reference.tokens([A, B], TOKENS)
    status, first = _prefill(pd, A, 7_000_010)
    assert status == 200 and first["kv_transfer_params"][ROOM] == 7_000_010
    status, second = _prefill(pd, B, 7_000_010)
    assert status == 200 and second["kv_transfer_params"] is None  # told: the room is taken
    b = run(_decode(pd, B, second["kv_transfer_params"]))  # a router forwards what prefill said
    a = run(_decode(pd, A, first["kv_transfer_params"]))
    assert (a.tokens, b.tokens) == (ref_a, ref_b)


def test_a_room_id_given_to_two_requests_at_once(pd: PD, reference: Reference) -> None:
    """(b) at once: both prefills, both decodes under one room: no swap, quick ends."""
    ref_a, ref_b = reference.tokens([A, B], TOKENS)
    room = 7_000_020
    params = {"do_remote_prefill": True, ROOM: room, BOOTSTRAP_ADDR: _addr(pd, reference)}

    async def everything() -> tuple[Completion, Completion, float]:
        started = time.monotonic()
        da = asyncio.ensure_future(_decode(pd, A, params))
        db = asyncio.ensure_future(_decode(pd, B, params))
        await asyncio.sleep(0.2)
        body = {"model": "tiny", "max_tokens": 1, "temperature": 0.0,
                "kv_transfer_params": {"do_remote_decode": True, ROOM: room}}  # fmt: skip
        await asyncio.gather(
            _post(pd.prefill.url, {**body, "prompt": A}), _post(pd.prefill.url, {**body, "prompt": B})
        )
        a, b = await asyncio.gather(da, db)
        return a, b, time.monotonic() - started

    a, b, took = run(everything())
    _own_or_error(a, ref_a, ref_b)
    _own_or_error(b, ref_b, ref_a)
    assert took < SOON, f"took {took:.1f} s"


def test_a_decode_prompt_other_than_prefills_fails_at_once(pd: PD, reference: Reference) -> None:
    status, first = _prefill(pd, A, 7_000_030)
    assert status == 200
    started = time.monotonic()
    c = run(_decode(pd, B, first["kv_transfer_params"]))
    assert not c.ok and time.monotonic() - started < SOON
    took = pd.wait_idle(SOON)  # prefill's blocks for A came back with the failed room
    assert took < SOON


def test_a_decode_that_leaves_before_prefill_opens_the_room(pd: PD, reference: Reference) -> None:
    room = 7_000_040
    params = {"do_remote_prefill": True, ROOM: room, BOOTSTRAP_ADDR: _addr(pd, reference)}

    async def leave() -> None:
        task = asyncio.ensure_future(_decode(pd, A, params))
        await asyncio.sleep(0.5)  # decode's page list waits on prefill for the room
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(leave())
    pd.wait_idle()
    status, _ = _prefill(pd, A, room)  # the room opens with no decode left for it
    assert status == 200
    started = time.monotonic()
    wait_for(lambda: metric(pd.prefill.url, "vllm:kv_cache_usage_perc") == 0.0, SOON, "prefill's blocks free")
    assert time.monotonic() - started < SOON


async def _stream_then_hold(url: str, body: dict[str, Any], started: asyncio.Event) -> None:
    """Stream a completion; set ``started`` once the server answered with headers, then hold."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/completions", json={**body, "stream": True}) as resp,
    ):
        started.set()
        async for _ in resp.content:
            pass


def test_a_prefill_request_aborted_before_it_was_scheduled(pd: PD, reference: Reference) -> None:
    room = 7_000_050
    params = {"do_remote_prefill": True, ROOM: room, BOOTSTRAP_ADDR: _addr(pd, reference)}
    busy = [prompt_ids(900, seed=600 + i) for i in range(12)]

    async def scenario() -> tuple[Completion, float]:
        decoding = asyncio.ensure_future(_decode(pd, A, params))
        await asyncio.sleep(0.5)  # its page list waits on prefill
        body = {"model": "tiny", "max_tokens": 1, "temperature": 0.0}
        load = [asyncio.ensure_future(_post(pd.prefill.url, {**body, "prompt": p})) for p in busy]
        await asyncio.sleep(0.05)  # prefill is busy with them: ours waits in its queue
        started = asyncio.Event()
        ours = asyncio.ensure_future(
            _stream_then_hold(
                pd.prefill.url,
                {**body, "prompt": A, "kv_transfer_params": {"do_remote_decode": True, ROOM: room}},
                started,
            )
        )
        # vLLM's server sends a stream's headers as it starts the request, so after them the
        # request is on its way to the engine.  A client gone before that never reaches the
        # engine at all: then prefill never learns of the room, and only decode's deadline (or
        # a router that also cancels decode) ends it, which is not the case under test.
        await asyncio.wait_for(started.wait(), 60)
        await asyncio.sleep(0.1)
        ours.cancel()  # the client is gone before vLLM scheduled it
        aborted = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await ours
        c = await decoding
        took = time.monotonic() - aborted
        await asyncio.gather(*load)
        return c, took

    c, took = run(scenario())
    assert not c.ok, "decode must not answer without prefill's KV"
    assert took < SOON, f"decode waited {took:.1f} s"
    events = [line for line in pd.prefill.tail(4000).splitlines() if f"room={room} " in line]
    assert any("dst=Failed" in e and "ended without KV to send" in e for e in events), (
        "prefill must have ended the room because its request ended unscheduled"
    )


def test_a_decode_request_aborted_before_it_was_scheduled(pd: PD, reference: Reference) -> None:
    """Prefill's room waits for decode; decode's request is gone before decode scheduled it."""
    room = 7_000_060
    _addr(pd, reference)  # decode already greeted this prefill (a router's first answer did it)
    status, data = _prefill(pd, A, room)
    assert status == 200
    params = data["kv_transfer_params"]
    held = "vllm:kv_cache_usage_perc"
    wait_for(lambda: (metric(pd.prefill.url, held) or 0.0) > 0.0, SOON, "prefill holding the room's blocks")
    busy = [prompt_ids(900, seed=700 + i) for i in range(12)]

    async def scenario() -> float:
        body = {"model": "tiny", "max_tokens": 1, "temperature": 0.0}
        load = [asyncio.ensure_future(_post(pd.decodes[0].url, {**body, "prompt": p})) for p in busy]
        await asyncio.sleep(0.05)  # decode is busy prefilling them locally: ours waits in its queue
        started = asyncio.Event()
        ours = asyncio.ensure_future(
            _stream_then_hold(pd.decodes[0].url, {**body, "prompt": A, "kv_transfer_params": params}, started)
        )
        await asyncio.wait_for(started.wait(), 60)  # on its way to decode's engine (see above)
        await asyncio.sleep(0.1)
        ours.cancel()
        aborted = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await ours
        while metric(pd.prefill.url, held) != 0.0 and time.monotonic() < aborted + 3 * SOON:
            await asyncio.sleep(0.02)  # the load's answers keep coming meanwhile
        took = time.monotonic() - aborted
        await asyncio.gather(*load)
        return took

    took = run(scenario())
    assert took < SOON, f"prefill held the room {took:.1f} s"
    events = [line for line in pd.prefill.tail(4000).splitlines() if f"room={room} " in line]
    assert any("dst=Failed" in e and "ended before its KV was received" in e for e in events), (
        "prefill must have ended the room because decode's request ended unscheduled"
    )
