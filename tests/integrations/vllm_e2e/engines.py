"""Real vLLM engines for the end-to-end suite: one engine as the reference, PD pairs over kvroom.

Every server is a process group started by :class:`kvroom.demo.vllm.servers.Server` and killed
by its owner's ``close()``, whatever happened.  Engines are bound to cores: prefill (and the
reference engine) to core 0, decode to core 1.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvroom.demo.vllm.client import Completion, complete_all, metric
from kvroom.demo.vllm.servers import Server, engine_env, free_port, proxy_command, vllm_command

HEARTBEAT = (0.5, 3.0)  # kvroom heartbeat interval and timeout in these engines, seconds
DEADLINES = [30.0, 30.0, 30.0]  # kvroom's per-state deadlines: far above every bound the tests check
MAX_MODEL_LEN = 1024
BLOCK = 128  # vLLM's CPU block size
BLOCK_BYTES = BLOCK * 2 * 32 * 2 * 4 * 4  # tokens x kv heads x head dim x (K, V) x float32 x layers


def run(coro: Any) -> Any:
    """Run a coroutine to completion (tests are synchronous)."""
    return asyncio.run(coro)


def wait_for(predicate: Any, timeout: float, what: str, period: float = 0.2) -> float:
    """Poll ``predicate`` until true; returns the seconds it took, AssertionError after ``timeout``."""
    start = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except OSError:
            pass
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout:.1f} s")
        time.sleep(period)


@dataclass
class Servers:
    """The servers one owner started; :meth:`close` kills every one of them."""

    logdir: Path
    started: list[Server] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None) -> Server:
        """Start one server (not waiting for it)."""
        server = Server(name, cmd, port, self.logdir / f"{name}.log", env)
        self.started.append(server)
        return server.start()

    def tails(self) -> str:
        """Every server's log tail."""
        return "\n".join(s.tail(40) for s in self.started)

    def close(self) -> None:
        """Kill every server's process group and check none of its processes is left."""
        for server in reversed(self.started):
            server.stop(timeout=5)
        for server in self.started:
            assert server.proc is None or server.proc.poll() is not None, f"{server.name} still runs"
            if server.proc is not None:
                try:
                    os.killpg(server.proc.pid, 0)
                except ProcessLookupError:
                    continue
                raise AssertionError(f"a process of {server.name}'s group outlived it")


class Reference:
    """One engine alone (core 0): the tokens every PD answer must equal, computed once per prompt."""

    def __init__(self, model: Path, servers: Servers) -> None:
        port = free_port()
        self.server = servers.start("single", vllm_command(model, port), port, engine_env(0))
        self._cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def tokens(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """One engine's greedy tokens for each prompt."""
        missing = [p for p in prompts if (tuple(p), max_tokens) not in self._cache]
        if missing:
            self.server.wait_ready()
            got: list[Completion] = run(complete_all(self.server.url, missing, max_tokens, stream=False))
            for prompt, completion in zip(missing, got, strict=True):
                assert completion.ok, completion.error
                self._cache[(tuple(prompt), max_tokens)] = completion.tokens
        return [self._cache[(tuple(p), max_tokens)] for p in prompts]


class PD:
    """A prefill engine (core 0) and decode engines (core 1) with kvroom's connector, and proxies."""

    def __init__(
        self,
        model: Path,
        servers: Servers,
        decodes: tuple[str, ...] = ("fail",),
        deadlines: list[float] = DEADLINES,
    ) -> None:
        self.model = model
        self.deadlines = deadlines
        self.servers = servers
        self.bootstrap_port = free_port()
        self.prefill = self._start_prefill()
        self.decodes = [self._start_decode(i, policy) for i, policy in enumerate(decodes)]
        self.policies = decodes
        self.proxies: dict[str, Server] = {}

    def _kvroom(self) -> dict[str, Any]:
        return {
            "deadlines": self.deadlines,
            "heartbeat_interval": HEARTBEAT[0],
            "heartbeat_timeout": HEARTBEAT[1],
        }

    def _start_prefill(self, port: int | None = None) -> Server:
        port = port or free_port()
        extra = {**self._kvroom(), "bootstrap_port": self.bootstrap_port}
        cmd = vllm_command(self.model, port, role="kv_producer", extra=extra, max_model_len=MAX_MODEL_LEN)
        return self.servers.start("prefill", cmd, port, engine_env(0))

    def _start_decode(self, index: int, policy: str, port: int | None = None) -> Server:
        port = port or free_port()
        cmd = vllm_command(
            self.model,
            port,
            role="kv_consumer",
            extra=self._kvroom(),
            policy=policy,
            max_model_len=MAX_MODEL_LEN,
        )
        return self.servers.start(f"decode{index}-{policy}", cmd, port, engine_env(1))

    def proxy(self, order: str = "sequential", decode: int | None = None) -> Server:
        """A proxy over prefill and every decode (or only decode ``decode``), started once per order."""
        key = f"{order}:{decode}"
        if key not in self.proxies:
            decodes = self.decodes if decode is None else [self.decodes[decode]]
            port = free_port()
            cmd = proxy_command([self.prefill.url], [d.url for d in decodes], port, order)
            self.proxies[key] = self.servers.start(f"proxy-{order}-{decode}", cmd, port).wait_ready(30)
        return self.proxies[key]

    def wait_ready(self) -> None:
        """Wait for every engine."""
        for server in (self.prefill, *self.decodes):
            server.wait_ready()

    def restart_decode(self, index: int) -> Server:
        """Kill decode ``index`` (if alive) and start it again on its port."""
        old = self.decodes[index]
        old.kill()
        new = self._start_decode(index, self.policies[index], old.port)
        self.decodes[index] = new
        return new.wait_ready()

    def engines(self) -> list[Server]:
        """The engines that run now."""
        return [s for s in (self.prefill, *self.decodes) if s.alive()]

    def idle(self, server: Server) -> bool:
        """No block in use, no kvroom room open, no request held by the connector."""
        return (
            metric(server.url, "vllm:kv_cache_usage_perc") == 0.0
            and metric(server.url, "vllm:kvroom_live_rooms") in (0.0, None)
            and metric(server.url, "vllm:kvroom_held_requests") in (0.0, None)
            and metric(server.url, "vllm:num_requests_running") == 0.0
            and metric(server.url, "vllm:num_requests_waiting") == 0.0
        )

    def wait_idle(self, timeout: float = 15.0) -> float:
        """Wait until every running engine is idle; the seconds it took."""
        return wait_for(lambda: all(self.idle(s) for s in self.engines()), timeout, "every engine idle")
