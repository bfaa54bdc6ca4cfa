"""Lets SGLang's disaggregation modules import in .venv-sglang, which has no torchvision.

torchvision has no CPU build for torch 2.13 here (installing it pulls a CUDA
torch, 5.9 GB), yet ``sglang.srt.disaggregation.utils`` imports
``sglang.srt.configs``, several of whose vision-model configs import
torchvision at module level.  The KV transfer path never uses them.
:func:`install` first lets transformers record that torchvision is absent (so
it keeps its own image code off), then puts import-only stand-ins for
``torchvision``, ``torchvision.transforms`` and its ``functional`` module in
``sys.modules``: any attribute is a placeholder that raises when called.
Call it before importing SGLang, in every process.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

MODULES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


class _Absent:
    """An attribute of the stand-in: usable in class bodies and defaults, raises when called."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, item: str) -> _Absent:
        if item.startswith("__"):
            raise AttributeError(item)
        return _Absent(f"{self._name}.{item}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"torchvision is not installed in this test environment ({self._name})")


def install() -> None:
    """Install the stand-ins unless torchvision is really there."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    from transformers.utils import import_utils

    assert not import_utils.is_torchvision_available()  # cached by transformers from here on
    for name in MODULES:
        module = types.ModuleType(name, "import-only stand-in: torchvision is not installed here")
        module.__getattr__ = _Absent(name).__getattr__  # type: ignore[method-assign]
        sys.modules[name] = module
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]  # type: ignore[attr-defined]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]  # type: ignore[attr-defined]
