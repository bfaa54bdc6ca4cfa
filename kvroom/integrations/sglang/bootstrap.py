"""The bootstrap server: SGLang's own HTTP ``CommonKVBootstrapServer``, unchanged.

Prefill ranks ``PUT /route`` their kvroom control-plane address; decode ranks
``GET /route`` it.  Everything after that (handshake, layouts, rooms) goes over
kvroom's own control plane.
"""

from __future__ import annotations

from sglang.srt.disaggregation.common.conn import CommonKVBootstrapServer

__all__ = ["KvroomKVBootstrapServer"]


class KvroomKVBootstrapServer(CommonKVBootstrapServer):  # type: ignore[misc]
    """SGLang's HTTP bootstrap server (``/route``, ``/health``), named for the kvroom backend."""
