"""One serving mode at a time: one engine alone, or a PD pair (kvroom's or NixlConnector) and a proxy.

Used by ``make demo-vllm`` (:mod:`kvroom.demo.vllm.__main__`) and ``benchmarks/vllm_pd.py``.
Every engine is bound to its own core: one engine alone and prefill to core 0, decode to core 1;
with ``pin`` (the default) every process of its server (API server and engine core too, not
only the model runner's OpenMP threads) runs there, so one engine alone really has one core.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvroom.demo.vllm.servers import Server, engine_env, free_port, pinned, proxy_command, vllm_command

__all__ = ["MODES", "Stack", "audit_times", "proxy_times"]

MODES = ("single", "kvroom", "nixl")
CORES = {"single": "0", "prefill": "0", "decode": "1", "proxy": "0"}  # the proxy beside prefill


@dataclass
class Stack:
    """The servers of one mode; :attr:`url` is where clients send completions."""

    mode: str
    model: Path
    logdir: Path
    order: str = "concurrent"  # kvroom's proxy order (NixlConnector's is always sequential)
    trace: bool = False  # the proxy writes each request's steps to its log (:func:`proxy_times`)
    pin: bool = True  # every process of an engine's server on its core, not only its OpenMP threads
    kvroom: dict[str, Any] = field(default_factory=lambda: {"deadlines": [30, 30, 30]})
    servers: list[Server] = field(default_factory=list)
    url: str = ""

    def start(self, timeout: float = 300.0) -> Stack:
        """Start the mode's servers and wait until every one answers."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "single":
            port = free_port()
            single = self._server("single", vllm_command(self.model, port), port, engine_env(CORES["single"]))
            single.wait_ready(timeout)
            self.url = single.url
            return self
        connector = self.mode
        pre_port, dec_port = free_port(), free_port()
        pre_extra, dec_extra = dict(self.kvroom), dict(self.kvroom)
        pre_env, dec_env = engine_env(CORES["prefill"]), engine_env(CORES["decode"])
        if connector == "kvroom":
            pre_extra["bootstrap_port"] = free_port()
        else:  # NixlConnector: its own side channel per engine, no kvroom options
            pre_extra, dec_extra = {}, {}
            pre_env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(free_port())
            dec_env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(free_port())
        prefill = self._server(
            "prefill",
            vllm_command(self.model, pre_port, role="kv_producer", connector=connector, extra=pre_extra),
            pre_port,
            pre_env,
        )
        decode = self._server(
            "decode",
            vllm_command(self.model, dec_port, role="kv_consumer", connector=connector, extra=dec_extra),
            dec_port,
            dec_env,
        )
        prefill.wait_ready(timeout)
        decode.wait_ready(timeout)
        port = free_port()
        order = self.order if connector == "kvroom" else "sequential"
        proxy = self._server(
            "proxy", proxy_command([prefill.url], [decode.url], port, order, connector, self.trace), port
        )
        proxy.wait_ready(60)
        self.url = proxy.url
        return self

    def _server(self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None) -> Server:
        if self.pin and name in CORES:
            cmd = pinned(cmd, CORES[name])
        server = Server(f"{self.mode}-{name}", cmd, port, self.logdir / f"{self.mode}-{name}.log", env)
        self.servers.append(server.start())
        return server

    def engine(self, name: str) -> Server | None:
        """The server called ``name`` (``single``, ``prefill``, ``decode``, ``proxy``)."""
        for server in self.servers:
            if server.name == f"{self.mode}-{name}":
                return server
        return None

    def stop(self) -> None:
        """Kill every server of the mode (process groups)."""
        for server in reversed(self.servers):
            server.stop(timeout=5)
        self.servers.clear()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_AUDIT = re.compile(r"(room\.created|room\.transition)\s.*?room=(\d+)\s.*?time=([0-9.]+)")
_DST = re.compile(r"dst=(\w+)")


def audit_times(log: Path) -> dict[int, dict[str, float]]:
    """Room id -> {"created": t, "<state>": t entered, ...} from kvroom's audit lines in a server log.

    Audit times are ``time.monotonic()`` of the engine's process: comparable with the client's
    own monotonic clock on one machine.
    """
    rooms: dict[int, dict[str, float]] = {}
    for line in log.read_text(errors="replace").splitlines():
        found = _AUDIT.search(line)
        if found is None:
            continue
        kind, room, when = found.group(1), int(found.group(2)), float(found.group(3))
        entry = rooms.setdefault(room, {})
        if kind == "room.created":
            entry["created"] = when
        else:
            dst = _DST.search(line)
            if dst is not None:
                entry.setdefault(dst.group(1), when)
    return rooms


def proxy_times(log: Path) -> dict[int, dict[str, float]]:
    """Room id -> {"prefill_sent": t, "prefill_answered": t, "decode_sent": t, ...} from the
    proxy's ``--trace`` lines (monotonic, the engines' and the client's clock)."""
    rooms: dict[int, dict[str, float]] = {}
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith('{"room"'):
            continue
        try:
            step = json.loads(line)
        except ValueError:
            continue
        rooms.setdefault(int(step["room"]), {}).setdefault(str(step["event"]), float(step["t"]))
    return rooms
