"""The examples run as a newcomer runs them, and the README's snippets are cut from them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ADDRESS = re.compile(r"^\d+\.\d+\.\d+\.\d+:\d+$")


def example(name: str, *args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / name), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so the finally below reaches every child
        cwd=ROOT,
        **kw,  # type: ignore[call-overload]
    )


def reap(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


@pytest.mark.slow
def test_prefill_and_decode_examples_move_a_room() -> None:
    prefill = example("prefill.py")
    decode = None
    try:
        assert prefill.stdout is not None
        lines = []
        for line in prefill.stdout:  # NIXL's own log lines come first
            lines.append(line)
            if ADDRESS.match(line.strip()):
                break
        else:
            pytest.fail("prefill printed no bootstrap address:\n" + "".join(lines))
        decode = example("decode.py", line.strip())
        out, _ = decode.communicate(timeout=90)
        assert decode.returncode == 0, out
        assert "room 42: received 4 pages, verified" in out
        rest, _ = prefill.communicate(timeout=60)
        assert prefill.returncode == 0, rest
        assert "room 42: sent 4 pages" in rest
    finally:
        reap(prefill, *([decode] if decode else []))


@pytest.mark.slow
def test_tensor_parallel_example() -> None:
    proc = example("tp.py")
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        reap(proc)
    assert proc.returncode == 0, out
    for rank in ("decode rank 0", "prefill rank 0", "prefill rank 1"):
        assert f"{rank}: Success\n" in out, out


def marked(path: Path, name: str) -> str:
    """The dedented lines between ``# --8<-- [start:name]`` and ``# --8<-- [end:name]``."""
    text = path.read_text()
    match = re.search(rf"\n[^\n]*# --8<-- \[start:{name}\]\n(.*?)\n[^\n]*# --8<-- \[end:{name}\]", text, re.S)
    assert match, f"{path.name} has no region {name!r}"
    return textwrap.dedent(match.group(1))


@pytest.mark.parametrize("region", ["prefill", "decode"])
def test_readme_scheduler_snippets_are_the_examples(region: str) -> None:
    snippet = marked(EXAMPLES / f"{region}.py", region)
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{snippet}\n```" in readme, (
        f"README.md must show examples/{region}.py's [{region}] region verbatim; paste:\n{snippet}"
    )
