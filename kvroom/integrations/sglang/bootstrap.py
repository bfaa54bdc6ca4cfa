"""The bootstrap server: SGLang's own HTTP ``CommonKVBootstrapServer``, with signed routes under keys.

Prefill ranks ``PUT /route`` their kvroom control-plane address; decode ranks
``GET /route`` it.  Everything after that (handshake, layouts, rooms) goes over
kvroom's own control plane.  With ``KVROOM_KEY_FILE`` set in the server's
process, a ``PUT /route`` is taken only when a trusted prefill key sealed it
(:mod:`kvroom.integrations.sglang.routes`); any other is answered 403 and
changes nothing.  Without a key the server is SGLang's, unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from sglang.srt.disaggregation.common.conn import CommonKVBootstrapServer

from kvroom.integrations.sglang.routes import RouteGuard

__all__ = ["KvroomKVBootstrapServer"]

log = logging.getLogger("sglang.srt.disaggregation.kvroom")


class KvroomKVBootstrapServer(CommonKVBootstrapServer):  # type: ignore[misc]
    """SGLang's HTTP bootstrap server (``/route``, ``/health``); routes checked against kvroom's keys."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.route_guard = RouteGuard.from_env()  # before SGLang's __init__ starts serving
        super().__init__(*args, **kwargs)

    async def _handle_route_put(self, request: web.Request) -> web.Response:
        guard = self.route_guard
        if guard is not None:
            try:
                payload = await request.json()  # aiohttp keeps the body: SGLang's handler reads it again
            except ValueError:
                return web.Response(text="route payload is not JSON", status=400)
            refused = guard.check(payload) if isinstance(payload, dict) else "route payload is not an object"
            if refused is not None:
                log.warning("kvroom: refused PUT /route from %s: %s", request.remote, refused)
                return web.Response(text=f"kvroom refused the route: {refused}", status=403)
        response: web.Response = await super()._handle_route_put(request)
        return response
