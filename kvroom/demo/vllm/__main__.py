"""``make demo-vllm``: kvroom's main job with real vLLM engines on this machine's CPUs.

Starts one engine alone (the reference) and a PD pair over kvroom with the reference proxy, every
engine bound to its own core; sends a few dozen greedy requests through the proxy with a progress
bar; prints tokens/s, time to first token, how many answers equal one engine's tokens, and
kvroom's room summary read from both engines' ``/metrics``.  Every server is killed at the end.

    python -m kvroom.demo.vllm [--requests 32] [--concurrency 8] [--prompt 256] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kvroom.demo.vllm.client import Completion, complete, complete_all, metric
from kvroom.demo.vllm.model import prompt_ids, write_tiny_llama
from kvroom.demo.vllm.stack import Stack


async def _with_progress(
    url: str, prompts: list[list[int]], tokens: int, concurrency: int
) -> list[Completion]:
    import aiohttp
    from tqdm import tqdm

    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(prompts), desc="kvroom PD", unit="req")
    async with aiohttp.ClientSession() as session:

        async def one(prompt: list[int]) -> Completion:
            async with gate:
                done = await complete(session, url, prompt, tokens)
                bar.update(1)
                return done

        out = list(await asyncio.gather(*(one(p) for p in prompts)))
    bar.close()
    return out


def _rooms(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        lines = [raw for raw in resp.read().decode().splitlines() if raw.startswith("vllm:kvroom_")]
    shown = []
    for raw in lines:
        name, value = raw.rsplit(" ", 1)
        if "_created" in name:
            continue
        labels = name.split("{", 1)[1].rstrip("}") if "{" in name else ""
        extra = [kv for kv in labels.split(",") if kv and not kv.startswith(("engine=", "model_name="))]
        short = name.split("{", 1)[0].removeprefix("vllm:kvroom_")
        shown.append(f"{short}{'[' + ','.join(extra) + ']' if extra else ''}={float(value):g}")
    return ", ".join(shown)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 when every answer equals one engine's tokens."""
    parser = argparse.ArgumentParser(prog="python -m kvroom.demo.vllm", description=__doc__)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=32, help="tokens to generate")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kvroom-demo-vllm-"))
    print(f"tiny seeded Llama, each server on its core (single and prefill: 0, decode: 1); logs in {work}")
    model = write_tiny_llama(work / "model")
    prompts = [prompt_ids(args.prompt, seed=i) for i in range(args.requests)]
    with Stack("single", model, work) as single:
        print("one engine alone: computing the reference tokens")
        reference = asyncio.run(complete_all(single.url, prompts, args.tokens, stream=False))
    with Stack("kvroom", model, work) as pd:
        start = time.monotonic()
        got = asyncio.run(_with_progress(pd.url, prompts, args.tokens, args.concurrency))
        wall = time.monotonic() - start
        prefill, decode = pd.engine("prefill"), pd.engine("decode")
        assert prefill is not None and decode is not None
        time.sleep(1.0)  # the engines publish their last stats
        rooms = f"prefill: {_rooms(prefill.url)}\ndecode:  {_rooms(decode.url)}"
        usage = [metric(s.url, "vllm:kv_cache_usage_perc") for s in (prefill, decode)]
    ok = [c for c in got if c.ok]
    equal = sum(c.tokens == r.tokens for c, r in zip(got, reference, strict=True))
    ttft = sorted(c.ttft for c in ok if c.ttft is not None)
    tokens = sum(len(c.tokens) for c in ok)
    print(f"{len(ok)}/{len(got)} requests answered in {wall:.2f} s: {tokens / wall:.0f} tokens/s")
    if ttft:
        print(
            f"time to first token: p50 {1000 * statistics.median(ttft):.1f} ms, max {1000 * ttft[-1]:.1f} ms"
        )
    print(f"tokens equal to one engine: {equal}/{len(got)}")
    print(f"kvroom rooms\n{rooms}")
    print(f"KV cache in use afterwards: prefill {usage[0]}, decode {usage[1]}")
    return 0 if equal == len(got) else 1


if __name__ == "__main__":
    sys.exit(main())
