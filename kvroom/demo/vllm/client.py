"""An OpenAI completions client for the tiny model: greedy tokens, time to first token, inter-token gaps.

Prompts are token id lists (the tiny model's tokenizer maps ``w<i>`` to id ``i``), sampling is
greedy (``temperature=0``, ``ignore_eos``), and answers are streamed so the time to first token
and every inter-token gap are measured on the client, as a user sees them.  Token ids come
back with the answer (``return_token_ids``), special tokens included.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

__all__ = ["Completion", "complete", "complete_all", "metric", "metric_total"]


@dataclass
class Completion:
    """One request's outcome as the client saw it."""

    status: int
    tokens: list[int] = field(default_factory=list)
    error: str = ""
    ttft: float | None = None  # seconds from sending to the first token
    gaps: list[float] = field(default_factory=list)  # seconds between later tokens
    total: float = 0.0

    @property
    def ok(self) -> bool:
        """An answer with no error."""
        return self.status == 200 and not self.error


async def complete(
    session: aiohttp.ClientSession,
    url: str,
    prompt: list[int],
    max_tokens: int,
    *,
    stream: bool = True,
    timeout: float = 120.0,
    extra: dict[str, Any] | None = None,
) -> Completion:
    """One greedy completion of ``prompt`` from ``url`` (a server's or the proxy's base URL)."""
    body: dict[str, Any] = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": stream,
        "return_token_ids": True,
        **(extra or {}),
    }
    start = time.monotonic()
    last = start
    out = Completion(status=0)
    try:
        async with session.post(
            url.rstrip("/") + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            out.status = resp.status
            if resp.status != 200:
                out.error = (await resp.text())[:1000]
                return out
            if not stream:
                data = await resp.json()
                out.tokens = list(data["choices"][0]["token_ids"])
            else:
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    event = json.loads(payload)
                    if "error" in event:
                        out.error = json.dumps(event["error"])[:1000]
                        break
                    ids = event["choices"][0].get("token_ids") or []
                    if not ids:
                        continue
                    now = time.monotonic()
                    if out.ttft is None:
                        out.ttft = now - start
                    else:
                        out.gaps.append(now - last)
                    last = now
                    out.tokens.extend(ids)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.total = time.monotonic() - start
    if out.ok and len(out.tokens) != max_tokens:
        out.error = f"{len(out.tokens)} tokens, asked for {max_tokens}"
    return out


async def complete_all(
    url: str, prompts: list[list[int]], max_tokens: int, *, concurrency: int = 16, stream: bool = True
) -> list[Completion]:
    """Every prompt, at most ``concurrency`` in flight, in order of the prompts."""
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:

        async def one(prompt: list[int]) -> Completion:
            async with gate:
                return await complete(session, url, prompt, max_tokens, stream=stream)

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def _samples(url: str, name: str, timeout: float) -> list[float]:
    """The values of every Prometheus sample ``name`` (any labels) at ``url``/metrics."""
    import urllib.request

    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as resp:
        lines = resp.read().decode().splitlines()
    return [
        float(raw.rsplit(" ", 1)[1])
        for raw in lines
        if raw.startswith(name) and raw[len(name) : len(name) + 1] in ("{", " ")
    ]


def metric(url: str, name: str, timeout: float = 5.0) -> float | None:
    """The value of Prometheus sample ``name`` (the first, labels ignored) at ``url``/metrics."""
    values = _samples(url, name, timeout)
    return values[0] if values else None


def metric_total(url: str, name: str, timeout: float = 5.0) -> float:
    """The sum of every sample of ``name`` at ``url``/metrics (all label sets; 0 when none)."""
    return sum(_samples(url, name, timeout))
