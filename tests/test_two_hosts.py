"""Two hosts: prefill and decode in separate network namespaces joined by a veth pair.

UCX runs over TCP on the veth link (``UCX_TLS=tcp``, ``UCX_NET_DEVICES`` the
veth end), the control plane binds the prefill namespace's address and is
authenticated with CURVE key pairs made by ``kvroom keys`` (binding a
non-loopback address needs them), and the decode side is SIGKILLed
mid-transfer: prefill fails exactly that decode's rooms, keeps running, and
serves a new decode.  Skips, saying why, where network namespaces cannot be
created (not root, no iproute2, no CAP_NET_ADMIN).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PREFILL_IP, DECODE_IP = "10.231.7.1", "10.231.7.2"


def sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str, str, str]]:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    tag = f"{os.getpid() % 100000}"
    ns_p, ns_d, veth_p, veth_d = f"kvp{tag}", f"kvd{tag}", f"kvvp{tag}", f"kvvd{tag}"
    made = sh("ip", "netns", "add", ns_p)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        steps = [
            ("ip", "netns", "add", ns_d),
            ("ip", "link", "add", veth_p, "type", "veth", "peer", "name", veth_d),
            ("ip", "link", "set", veth_p, "netns", ns_p),
            ("ip", "link", "set", veth_d, "netns", ns_d),
            ("ip", "-n", ns_p, "addr", "add", f"{PREFILL_IP}/24", "dev", veth_p),
            ("ip", "-n", ns_d, "addr", "add", f"{DECODE_IP}/24", "dev", veth_d),
            ("ip", "-n", ns_p, "link", "set", veth_p, "up"),
            ("ip", "-n", ns_d, "link", "set", veth_d, "up"),
            ("ip", "-n", ns_p, "link", "set", "lo", "up"),
            ("ip", "-n", ns_d, "link", "set", "lo", "up"),
        ]
        for step in steps:
            done = sh(*step)
            if done.returncode != 0:
                pytest.skip(f"cannot set up the veth link ({' '.join(step)}): {done.stderr.strip()}")
        yield ns_p, ns_d, veth_p, veth_d
    finally:
        sh("ip", "netns", "del", ns_p)
        sh("ip", "netns", "del", ns_d)


@pytest.fixture
def keys(tmp_path: Path) -> str:
    """Key pairs ``prefill`` and ``decode``, written by the ``kvroom keys`` command."""
    for name in ("prefill", "decode"):
        made = sh(sys.executable, "-m", "kvroom", "keys", str(tmp_path), "--name", name)
        assert made.returncode == 0, made.stderr
    return str(tmp_path)


class Node:
    """A node process inside a namespace, talking JSON lines."""

    def __init__(self, ns: str, device: str, keys: str, *args: str) -> None:
        env = {
            **os.environ, "UCX_TLS": "tcp", "UCX_NET_DEVICES": device, "PYTHONPATH": str(ROOT),
            "KVROOM_TEST_KEYS": keys,
        }  # fmt: skip
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - the node's stderr, shown when it goes quiet
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.netns_node", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            cwd=ROOT, env=env, start_new_session=True,
        )  # fmt: skip
        self.inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # drained all the time, so the node never blocks on a full pipe
            if line.startswith("{"):  # NIXL and structlog also print to stdout: ours are JSON objects
                self.inbox.put(json.loads(line))
        self.inbox.put(None)

    def read(self, timeout: float = 60.0) -> dict[str, Any]:
        try:
            data = self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"node said nothing for {timeout:g} s; its stderr ends:\n{self.tail()}"
            ) from None
        if data is None:
            raise EOFError(f"node exited with {self.proc.wait(5)}; its stderr ends:\n{self.tail()}")
        result: dict[str, Any] = data
        return result

    def tail(self) -> str:
        self.log.seek(0)
        return "".join(self.log.readlines()[-20:])

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
        self.proc.wait(10)


def results(node: Node, count: int) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    while len(out) < count:
        entry = node.read()
        if "room" in entry:
            out[entry["room"]] = entry
    return out


def test_prefill_and_decode_on_two_hosts_survive_a_decode_kill(
    namespaces: tuple[str, str, str, str], keys: str
) -> None:
    ns_p, ns_d, veth_p, veth_d = namespaces
    first, doomed, later = list(range(0, 6)), list(range(10, 16)), list(range(20, 26))
    prefill = Node(ns_p, veth_p, keys, "prefill", PREFILL_IP, *map(str, first + doomed + later))
    nodes = [prefill]
    try:
        addr = prefill.read()["addr"]
        assert addr.startswith(PREFILL_IP), addr

        def decode(rooms: list[int]) -> Node:
            node = Node(ns_d, veth_d, keys, "decode", addr, *map(str, rooms))
            nodes.append(node)
            assert node.read()["ready"]
            return node

        def serve(rooms: list[int]) -> None:
            """A new decode gets every room byte for byte, and prefill sees each succeed."""
            node = decode(rooms)
            for room in rooms:
                prefill.tell(f"go {room}")
            got = results(node, len(rooms))
            assert all(
                r["state"] == "Success" and r["verified"] and not r["footprint"] for r in got.values()
            ), got
            assert all(r["state"] == "Success" for r in results(prefill, len(rooms)).values())

        serve(first)
        b = decode(doomed)
        time.sleep(0.5)  # prefill has every page list: its rooms wait for our "go"
        b.kill()
        for room in doomed:
            prefill.tell(f"go {room}")  # the scheduler races the loss: nothing may escape
        lost = results(prefill, len(doomed))
        assert all(r["state"] == "Failed" and not r["footprint"] for r in lost.values()), lost
        assert {r["error"].split(":")[0] for r in lost.values()} <= {"PeerLostError", "RemoteFailureError"}, (
            lost
        )

        serve(later)
        assert prefill.proc.poll() is None, "prefill died"
        assert prefill.proc.stdin is not None
        prefill.proc.stdin.close()
        closing = prefill.read()
        assert closing == {"closing": True, "live": 0}
        assert prefill.proc.wait(15) == 0
    finally:
        for node in nodes:
            node.kill()
