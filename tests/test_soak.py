"""Chaos soak: a thousand rooms, one prefill and two decode processes, faults at random.

Decode processes are killed and restarted, stopped past the transfer deadline
and resumed, and rooms are aborted from both sides, at random points (seeded)
while rooms flow.  The demo driver then requires: every room terminal, every
Success byte-identical, no exception escaped ``send()``/``poll()``, an empty
footprint for every terminal room on every process (restarted ones included)
and an audit log that ``kvroom audit`` replays cleanly.  On top, this test
reads the audit log and checks that no room stayed in a state past its
deadline (plus, on decode, the bounded wait for prefill's confirmation).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

import pytest

from kvroom.demo.run import Demo, _options
from kvroom.observe.replay import main as audit_main

SEED = 7


def chaos_plan(rng: random.Random) -> list[tuple[float, str]]:
    steps = ["kill"] * 3 + ["stop"] * 2 + ["abort"] * 4
    return sorted((round(rng.uniform(0.05, 0.9), 3), step) for step in steps)


@pytest.mark.timeout(300)
def test_a_thousand_rooms_survive_random_kills_stops_and_aborts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = str(tmp_path / "audit.jsonl")
    Path(log).touch()
    args = argparse.Namespace(
        requests=1000, decodes=2, min_pages=1, max_pages=8, chunk_pages=4, page_kib=4, layers=2,
        concurrency=32, seed=SEED, chaos=True, audit_log=log, host="127.0.0.1", port=0, timeout=240.0,
    )  # fmt: skip
    plan = chaos_plan(random.Random(SEED))
    demo = Demo(args, log, plan=plan)
    try:
        status = demo.run()
    finally:
        demo.cluster.close()
    out = capsys.readouterr().out
    assert status == 0, out[-4000:]
    assert out.count("chaos: killed") == 3 and out.count("chaos: stopped") == 2, out[-2000:]
    assert len(demo.submitted) == 1000 and "kvroom demo: OK" in out
    assert all(not n.alive() for n in demo.cluster.nodes), "a node outlived the soak"
    assert audit_main(log) == 0

    # time in each state, from the audit log, against the deadlines the nodes ran with
    opts = _options(args, log)
    limits = dict(zip(("Bootstrapping", "WaitingForInput", "Transferring"), opts.deadlines, strict=True))
    confirm = 2 * opts.heartbeat[1]  # decode waits this long at most for prefill's word
    entered: dict[tuple[str, int], tuple[str, float]] = {}
    overruns: list[str] = []
    seen = defaultdict(int)
    with open(log) as f:
        for line in f:
            entry = json.loads(line)
            if entry.get("event") == "room.created":  # time in Bootstrapping counts from here
                entered[(entry["process"], entry["room"])] = ("Bootstrapping", entry["time"])
                continue
            if entry.get("event") != "room.transition" or entry["src"] == entry["dst"]:
                continue
            key = (entry["process"], entry["room"])
            seen[entry["role"]] += 1
            if key in entered and entered[key][0] == entry["src"]:
                state, since = entered[key]
                limit = limits[state] + (confirm if entry["role"] == "receiver" else 0.0) + 1.0
                if entry["time"] - since > limit:
                    overruns.append(
                        f"{key} stayed {entry['time'] - since:.1f} s in {state} (limit {limit:g})"
                    )
            entered[key] = (entry["dst"], entry["time"])
    assert seen["sender"] > 1000 and seen["receiver"] > 1000
    assert not overruns, overruns[:5]
