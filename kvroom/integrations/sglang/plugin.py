"""The SGLang plugin: makes ``kvroom`` a ``--disaggregation-transfer-backend`` choice.

SGLang calls :func:`register` from ``load_plugins()`` (before argument parsing
and in every scheduler process).  It registers two hooks with SGLang's hook
registry, which applies them right after the plugins ran:

- ``TransferBackend`` is REPLACEd by the same enum plus ``KVROOM = "kvroom"``
  (the registry also rebinds every module that imported the old enum);
- ``get_kv_class`` is wrapped (AROUND): for the kvroom backend it returns the
  classes of :mod:`kvroom.integrations.sglang.conn`, for any other backend it
  calls SGLang's own function.

On an SGLang release other than :data:`TESTED_SGLANG_VERSION` the plugin still
registers, and logs a warning naming the version it was tested with.
"""

from __future__ import annotations

import enum
import logging
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from kvroom.integrations.sglang import BACKEND_NAME, TESTED_SGLANG_VERSION

__all__ = ["kv_class", "register"]

log = logging.getLogger("sglang.srt.disaggregation.kvroom")

UTILS = "sglang.srt.disaggregation.utils"


def _installed_version() -> str | None:
    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


def _with_kvroom(original: type[enum.Enum]) -> type[enum.Enum]:
    """``TransferBackend`` with every original member plus ``KVROOM``."""
    if any(member.value == BACKEND_NAME for member in original):
        return original
    members = {member.name: member.value for member in original}
    members["KVROOM"] = BACKEND_NAME
    extended = enum.Enum(original.__name__, members)  # type: ignore[misc]
    extended.__module__ = original.__module__
    extended.__qualname__ = original.__qualname__
    return extended


def kv_class(class_type: Any) -> type | None:
    """The kvroom class SGLang asks for (``KVClassType`` member), as ``get_kv_class`` returns it."""
    from sglang.srt.disaggregation.base.conn import KVArgs

    from kvroom.integrations.sglang import conn

    mapping: dict[str, type] = {
        "kvargs": KVArgs,
        "manager": conn.KvroomKVManager,
        "sender": conn.KvroomKVSender,
        "receiver": conn.KvroomKVReceiver,
        "bootstrap_server": conn.KvroomKVBootstrapServer,
    }
    return mapping.get(getattr(class_type, "value", class_type))


def _get_kv_class_around(original: Any, transfer_backend: Any, class_type: Any) -> Any:
    if getattr(transfer_backend, "value", transfer_backend) == BACKEND_NAME:
        return kv_class(class_type)
    return original(transfer_backend, class_type)


def register() -> None:
    """Entry point of the ``sglang.srt.plugins`` group named ``kvroom``."""
    installed = _installed_version()
    if installed != TESTED_SGLANG_VERSION:
        log.warning(
            "kvroom's SGLang backend was tested with sglang==%s; this is sglang==%s. "
            "It is registered anyway: check `make test-sglang` against this version.",
            TESTED_SGLANG_VERSION,
            installed,
        )
    from sglang.srt.arg_groups.choices import (
        DISAGG_TRANSFER_BACKEND_CHOICES,
        add_disagg_transfer_backend_choices,
    )
    from sglang.srt.disaggregation import utils
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND_NAME not in DISAGG_TRANSFER_BACKEND_CHOICES:
        add_disagg_transfer_backend_choices([BACKEND_NAME])
    HookRegistry.register(f"{UTILS}.TransferBackend", _with_kvroom(utils.TransferBackend), HookType.REPLACE)
    HookRegistry.register(f"{UTILS}.get_kv_class", _get_kv_class_around, HookType.AROUND)
