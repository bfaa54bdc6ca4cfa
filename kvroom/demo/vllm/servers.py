"""vLLM OpenAI servers and kvroom's proxy as child process groups that never outlive their owner.

:class:`Server` starts one command in a new session (its own process group, so every process
vLLM spawns goes with it), writes its output to a log file, waits for ``/health``, and kills the
whole group on :meth:`Server.stop` (also registered with ``atexit``).  A server that exits
while starting raises :class:`ServerError` with the tail of its log.  :func:`vllm_command` and
:func:`proxy_command` build the commands; every engine is bound to one core
(``VLLM_CPU_OMP_THREADS_BIND``): unbound, two engines' OpenMP threads fight over the cores.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Server", "ServerError", "vllm_command", "proxy_command", "free_port", "engine_env", "pinned"]

_LIVE: set[Server] = set()


class ServerError(RuntimeError):
    """A server did not come up; the message ends with its log's tail."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, below the ephemeral range when possible."""
    import random
    import socket

    for _ in range(200):
        port = random.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def engine_env(core: int | str, kv_cache_gib: int = 1) -> dict[str, str]:
    """The environment of one vLLM CPU engine bound to ``core`` (no hub, a small KV cache)."""
    env = dict(os.environ)
    env.update(
        VLLM_CPU_OMP_THREADS_BIND=str(core),
        VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def pinned(cmd: list[str], core: int | str) -> list[str]:
    """``cmd`` with every process it starts confined to ``core``.

    ``VLLM_CPU_OMP_THREADS_BIND`` binds only the model runner's threads; vLLM's API server and
    engine-core processes float over every core, where they take time from the other engine's
    forward (the engine core steps every millisecond while a request waits for its KV).
    """
    run = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); os.execv(sys.argv[2], sys.argv[2:])"
    return [sys.executable, "-c", run, str(core), *cmd]


def vllm_command(
    model: str | Path,
    port: int,
    *,
    role: str | None = None,
    connector: str = "kvroom",
    extra: dict[str, Any] | None = None,
    policy: str = "fail",
    max_model_len: int = 1024,
    max_num_seqs: int = 32,
) -> list[str]:
    """``python -m vllm.entrypoints.openai.api_server`` for ``model`` on ``port``.

    ``role``: None (one engine alone), ``"kv_producer"`` (prefill) or ``"kv_consumer"``
    (decode); ``connector``: ``"kvroom"`` (kvroom's, by module path) or ``"nixl"`` (vLLM's
    NixlConnector on CPU buffers); ``extra``: the connector's extra config.
    """
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--seed", "0", "--max-model-len", str(max_model_len),
        "--max-num-seqs", str(max_num_seqs), "--served-model-name", "tiny",
    ]  # fmt: skip
    if role is not None:
        if connector == "kvroom":
            transfer: dict[str, Any] = {
                "kv_connector": "KVRoomConnector",
                "kv_connector_module_path": "kvroom.integrations.vllm",
            }
        elif connector == "nixl":
            transfer = {"kv_connector": "NixlConnector", "kv_buffer_device": "cpu"}
        else:
            raise ValueError(f"connector must be 'kvroom' or 'nixl', got {connector!r}")
        transfer.update(kv_role=role, kv_load_failure_policy=policy, kv_connector_extra_config=extra or {})
        cmd += ["--kv-transfer-config", json.dumps(transfer)]
    return cmd


def proxy_command(
    prefill: Sequence[str],
    decode: Sequence[str],
    port: int,
    order: str = "sequential",
    connector: str = "kvroom",
    trace: bool = False,
) -> list[str]:
    """kvroom's reference proxy over ``prefill`` and ``decode`` base URLs (``trace``: ``--trace``)."""
    return [
        sys.executable, "-m", "kvroom.integrations.vllm.proxy", "--port", str(port), "--order", order,
        "--connector", connector, *(["--trace"] if trace else []), "--prefill", *prefill, "--decode", *decode,
    ]  # fmt: skip


class Server:
    """One child process group serving HTTP on ``port``; ``log`` receives its output."""

    def __init__(
        self, name: str, cmd: list[str], port: int, log: str | Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = Path(log)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        """Start the process group (not waiting for it)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        _LIVE.add(self)
        return self

    def wait_ready(self, timeout: float = 240.0, path: str = "/health") -> Server:
        """Wait until ``path`` answers 200; ServerError with the log tail if it exits or times out."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ServerError(f"{self.name} exited with {code} while starting\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise ServerError(f"{self.name} not ready after {timeout:.0f} s\n{self.tail()}")

    def alive(self) -> bool:
        """True while the main process runs."""
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL what is left after ``timeout``; wait for the main process."""
        proc = self.proc
        if proc is None:
            return
        self.signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole group at once and reap the main process."""
        proc = self.proc
        if proc is None:
            return
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        _wait_group_gone(proc.pid)
        _LIVE.discard(self)

    def tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the log."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log})"
        return "\n".join(f"[{self.name}] {line}" for line in text.splitlines()[-lines:])

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Wait until no process of group ``pgid`` is left (zombies of other parents included)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.05)


@atexit.register
def _kill_all() -> None:
    for server in list(_LIVE):
        server.kill()
