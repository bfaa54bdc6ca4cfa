"""kvroom as a vLLM KV connector: ``kv_connector_module_path="kvroom.integrations.vllm"``.

Needs vLLM (``pip install 'kvroom[vllm]'``).  :class:`KVRoomConnector` is the
class vLLM loads (``kv_connector="KVRoomConnector"``); the ``kv_transfer_params``
keys it reads are in :mod:`.params`.
"""

from kvroom.integrations.vllm.connector import KVRoomConnector, manager_config
from kvroom.integrations.vllm.params import BOOTSTRAP_ADDR, ROOM, decode_params

__all__ = ["KVRoomConnector", "manager_config", "ROOM", "BOOTSTRAP_ADDR", "decode_params"]
