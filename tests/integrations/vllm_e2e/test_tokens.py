"""kvroom PD with real vLLM engines gives one engine's tokens, and leaves nothing behind.

The suite's shared PD pair (prefill on core 0, decode on core 1, kvroom's connector on both)
and kvroom's proxy, started once; the reference is one engine alone.  Greedy sampling: every answer
must equal the reference token for token.  After each test every engine is idle: no block in
use (``vllm:kv_cache_usage_perc``), no kvroom room open, no request held by the connector.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from kvroom.demo.vllm.client import complete, complete_all, metric, metric_total
from kvroom.demo.vllm.model import prompt_ids
from tests.integrations.vllm_e2e.engines import (
    BLOCK,
    BLOCK_BYTES,
    MAX_MODEL_LEN,
    PD,
    Reference,
    Servers,
    run,
    wait_for,
)

TOKENS = 16


# the shared engines start inside the first test's setup
pytestmark = [pytest.mark.usefixtures("idle_after"), pytest.mark.timeout(900)]


def _counts(pd: PD) -> tuple[float, float]:
    return tuple(metric(s.url, "vllm:kvroom_bytes_total") or 0.0 for s in (pd.prefill, pd.decodes[0]))  # type: ignore[return-value]


def _bytes(pd: PD) -> tuple[float, float]:
    """kvroom's bytes moved so far, prefill's and decode's count, once both engines published them.

    Each engine publishes a room's bytes with a later step's stats; every room here moves the
    same bytes on both sides, so the two counts agree once both are published.
    """
    wait_for(lambda: (lambda c: c[0] == c[1])(_counts(pd)), 15, "both engines' byte counts published")
    return _counts(pd)


def test_prompts_from_one_token_to_near_max_model_len(pd: PD, reference: Reference) -> None:
    lengths = [1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 7, MAX_MODEL_LEN - TOKENS]
    prompts = [prompt_ids(n, seed=n) for n in lengths]
    before = _bytes(pd)
    got = run(complete_all(pd.proxy().url, prompts, TOKENS, concurrency=1))
    assert [c.error for c in got] == [""] * len(prompts)
    assert [c.tokens for c in got] == reference.tokens(prompts, TOKENS)
    blocks = sum(-(-n // BLOCK) for n in lengths)
    after = _bytes(pd)
    assert after[0] - before[0] == after[1] - before[1] == blocks * BLOCK_BYTES  # every block once


def test_sixteen_requests_at_once(pd: PD, reference: Reference) -> None:
    prompts = [prompt_ids(200 + 9 * i, seed=1000 + i) for i in range(16)]
    got = run(complete_all(pd.proxy().url, prompts, TOKENS, concurrency=16))
    assert [c.error for c in got] == [""] * 16
    assert [c.tokens for c in got] == reference.tokens(prompts, TOKENS)


def test_a_decode_prefix_hit_moves_only_the_blocks_past_it(pd: PD, reference: Reference) -> None:
    prefix = prompt_ids(3 * BLOCK, seed=77)
    first, second = prefix + prompt_ids(40, seed=78), prefix + prompt_ids(150, seed=79)
    url = pd.proxy().url
    (a,) = run(complete_all(url, [first], TOKENS))
    before = _bytes(pd)
    (b,) = run(complete_all(url, [second], TOKENS))
    after = _bytes(pd)
    assert [a.tokens, b.tokens] == reference.tokens([first, second], TOKENS)
    moved = (-(-len(second) // BLOCK) - 3) * BLOCK_BYTES  # decode held the prefix's 3 blocks
    assert after[0] - before[0] == after[1] - before[1] == moved


@pytest.mark.parametrize("order", ["sequential", "concurrent"])
def test_decode_sent_after_or_before_prefill_finishes(pd: PD, reference: Reference, order: str) -> None:
    """sequential: decode gets prefill's answer; concurrent: decode's page list waits for prefill."""
    proxy = pd.proxy(order)
    prompts = [prompt_ids(300 + i, seed=2000 + i) for i in range(8)]
    run(complete_all(proxy.url, prompts[:1], TOKENS))  # the proxy learns prefill's kvroom address
    got = run(complete_all(proxy.url, prompts, TOKENS, concurrency=4))
    assert [c.error for c in got] == [""] * len(prompts)
    assert [c.tokens for c in got] == reference.tokens(prompts, TOKENS)


async def _disconnect(url: str, prompt: list[int], max_tokens: int, after_tokens: int) -> int:
    """Stream a completion and drop the connection after ``after_tokens`` tokens (0: before any)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}  # fmt: skip
    seen = 0
    async with aiohttp.ClientSession() as session:
        if after_tokens == 0:  # gone while prefill computes: the proxy has not answered yet
            task = asyncio.ensure_future(session.post(url + "/v1/completions", json=body))
            await asyncio.sleep(0.02)
            task.cancel()
            try:
                resp = await task
            except asyncio.CancelledError:
                return 0
            resp.close()  # the answer's headers beat the cancel: gone before its first token
            return 0
        async with session.post(url + "/v1/completions", json=body) as resp:
            async for line in resp.content:
                if line.startswith(b"data:") and b'"token_ids":[' in line:
                    seen += 1
                    if seen >= after_tokens:
                        break
    return seen


@pytest.mark.parametrize("order", ["sequential", "concurrent"])
@pytest.mark.parametrize("side", ["decode", "prefill"])
def test_a_client_that_disconnects_leaves_nothing_held(
    pd: PD, reference: Reference, side: str, order: str
) -> None:
    """Concurrent: prefill's and decode's requests are both in flight when the client leaves."""
    url = pd.proxy(order).url
    if order == "concurrent":  # the proxy learns prefill's kvroom address from a first answer
        run(complete_all(url, [prompt_ids(8, seed=3200)], 2))
    seed = (3000 if side == "decode" else 3100) + (50 if order == "concurrent" else 0)
    prompt = prompt_ids(MAX_MODEL_LEN - 300, seed=seed)  # nothing cached
    before = _reached(pd, order)
    seen = run(_disconnect(url, prompt, 200, 3 if side == "decode" else 0))
    assert seen == (3 if side == "decode" else 0)
    # the request reached the engines (an idle read before that would prove nothing), then nothing
    # is held; sequential: prefill always finishes it (the proxy hands its room to decode)
    wait_for(lambda: _reached(pd, order) > before, 30, "the engines got the request")
    pd.wait_idle()  # the abandoned request's blocks and room are gone on both engines
    prompts = [prompt_ids(100, seed=3001)]
    (after,) = run(complete_all(url, prompts, TOKENS))
    assert (after.status, after.error) == (200, "")
    assert after.tokens == reference.tokens(prompts, TOKENS)[0]


def _reached(pd: PD, order: str) -> float:
    """What rises once an abandoned request reached the engines: prefill's prompt tokens (prefill
    ran it) and, concurrent, the kvroom rooms failed on either side (it was aborted before or after)."""
    ran = metric_total(pd.prefill.url, "vllm:prompt_tokens_total")
    if order == "sequential":
        return ran
    return ran + sum(metric_total(s.url, "vllm:kvroom_failures_total") for s in (pd.prefill, pd.decodes[0]))


def test_the_proxy_reports_a_dead_upstream_as_an_http_error(pd: PD, servers: Servers) -> None:
    from kvroom.demo.vllm.servers import free_port, proxy_command

    port, dead = free_port(), f"http://127.0.0.1:{free_port()}"
    proxy = servers.start("proxy-dead", proxy_command([dead], [pd.decodes[0].url], port), port).wait_ready(30)

    async def one() -> tuple[int, str]:
        async with aiohttp.ClientSession() as session:
            c = await complete(session, proxy.url, [5, 6, 7], 4, timeout=20)
            return c.status, c.error

    status, error = run(one())
    assert status == 502 and "unreachable" in error and dead in error
