"""A reference router for vLLM prefill/decode over kvroom: one room id per request, both sides.

``python -m kvroom.integrations.vllm.proxy --prefill URL [URL ...] --decode URL [URL ...]``
serves OpenAI's ``/v1/completions`` and ``/v1/chat/completions``.  Per request it picks a
prefill and a decode server round-robin and a fresh random room id, then:

1. sends the request to prefill with ``max_tokens=1`` (no streaming) and
   ``kv_transfer_params={"do_remote_decode": True, "kvroom_room": ROOM}``;
2. sends the original request to decode with the room and prefill's kvroom addresses in
   ``kv_transfer_params``, and streams (or returns) decode's answer to the client.

The order (``--order``): ``concurrent``, kvroom's default, sends the decode request at once,
beside the prefill one, once it knows that prefill's kvroom addresses (learned from its first
answer): decode admits the request and its page list reaches prefill while prefill computes, so
prefill pushes the moment its request finishes, without a second round trip
(``benchmarks/vllm_pd.py``: one at a time, time to first token 40 against 51 ms sequential).
``sequential`` sends decode the ``kv_transfer_params`` prefill answered, after its answer.

Failures are HTTP errors, never hangs: an unreachable or dead upstream is a 502 naming it, a
prefill that answers without room params (it refused the room id, or the request) a 502 saying
so, an upstream error status is passed through.  A client that disconnects during decode closes
decode's request, so vLLM aborts it (and kvroom fails its room on both sides); one gone while
prefill runs lets that prefill finish and has decode take the room for one token nobody reads,
since an abort racing prefill's end could leave a room that no decode comes for.  A stream decode
breaks mid-way ends with an ``error`` event.  Needs ``aiohttp`` (a vLLM dependency).

``--connector nixl`` routes vLLM's own NixlConnector the same way (no room id: prefill's params
go to decode as they are; sequential order, its default), so both connectors are measured through one
router (``benchmarks/vllm_pd.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp import web

from kvroom.integrations.vllm.params import BOOTSTRAP_ADDR, ROOM

__all__ = ["Proxy", "build_app", "main"]

_ROUTES = ("/v1/completions", "/v1/chat/completions")


class UpstreamError(Exception):
    """An upstream server could not be reached or answered with an error."""

    def __init__(self, status: int, message: str, kind: str = "upstream_error") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status)


class Proxy:
    """Round-robin over prefill and decode servers; one kvroom room per request."""

    def __init__(
        self,
        prefill: Sequence[str],
        decode: Sequence[str],
        *,
        order: str | None = None,
        connector: str = "kvroom",
        connect_timeout: float = 5.0,
        timeout: float = 600.0,
        trace: bool = False,
    ) -> None:
        if not prefill or not decode:
            raise ValueError("the proxy needs at least one prefill and one decode URL")
        if order is None:  # kvroom takes decode's page list before prefill has the request
            order = "concurrent" if connector == "kvroom" else "sequential"
        if order not in ("sequential", "concurrent"):
            raise ValueError(f"order must be 'sequential' or 'concurrent', got {order!r}")
        self.prefill = [u.rstrip("/") for u in prefill]
        self.decode = [u.rstrip("/") for u in decode]
        if connector not in ("kvroom", "nixl"):
            raise ValueError(f"connector must be 'kvroom' or 'nixl', got {connector!r}")
        if connector == "nixl" and order != "sequential":
            raise ValueError("NixlConnector's decode needs prefill's answer: sequential order only")
        self.order = order
        self.connector = connector
        self._next_prefill = itertools.cycle(self.prefill)
        self._next_decode = itertools.cycle(self.decode)
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._session: aiohttp.ClientSession | None = None
        self.bootstrap: dict[str, list[str]] = {}  # prefill URL -> its kvroom addresses (learned)
        self.served = 0
        self._releasing: set[asyncio.Future[None]] = set()  # rooms of clients gone mid-prefill
        self.trace = trace
        self.failed = 0

    async def start(self, _app: web.Application | None = None) -> None:
        """Open the upstream connection pool."""
        self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def close(self, _app: web.Application | None = None) -> None:
        """Close the upstream connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _trace(self, room: int, event: str) -> None:
        """``--trace``: one JSON line per step of a request, monotonic seconds (the engines' clock)."""
        if self.trace:
            print(
                json.dumps({"room": room, "event": event, "t": time.monotonic()}), file=sys.stderr, flush=True
            )

    # -- upstream calls -----------------------------------------------------------

    async def _post_json(self, url: str, body: dict[str, Any], who: str) -> dict[str, Any]:
        assert self._session is not None
        try:
            async with self._session.post(url, json=body) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise UpstreamError(resp.status, f"{who} {url} answered {resp.status}: {text[:500]}")
                data: dict[str, Any] = json.loads(text)
                return data
        except aiohttp.ClientError as exc:
            raise UpstreamError(502, f"{who} {url} unreachable: {exc}", "upstream_unavailable") from None
        except asyncio.TimeoutError:
            raise UpstreamError(504, f"{who} {url} did not answer in time", "upstream_timeout") from None

    async def _prefill(self, url: str, path: str, body: dict[str, Any], room: int) -> dict[str, Any]:
        req = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        ask: dict[str, Any] = {"do_remote_decode": True}
        if self.connector == "kvroom":
            ask[ROOM] = room
        req.update(max_tokens=1, stream=False, kv_transfer_params=ask)
        if "max_completion_tokens" in req:
            req["max_completion_tokens"] = 1
        self._trace(room, "prefill_sent")
        answer = await self._post_json(url + path, req, "prefill")
        self._trace(room, "prefill_answered")
        params = answer.get("kv_transfer_params")
        if not isinstance(params, dict) or (self.connector == "kvroom" and params.get(ROOM) != room):
            raise UpstreamError(
                502,
                f"prefill {url} gave no kvroom room for the request (room id {room} in use?)",
                "room_refused",
            )
        addrs = params.get(BOOTSTRAP_ADDR)
        if isinstance(addrs, list) and addrs:
            self.bootstrap[url] = addrs
        return params

    # -- the route ------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """One completion: prefill (one token, KV kept), then decode's answer to the client."""
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not JSON", "invalid_request_error")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object", "invalid_request_error")
        prefill, decode = next(self._next_prefill), next(self._next_decode)
        room = secrets.randbits(62)
        path = request.path
        known = self.bootstrap.get(prefill)
        try:
            if self.order == "concurrent" and known:
                params = {
                    "do_remote_prefill": True,
                    "do_remote_decode": False,
                    ROOM: room,
                    BOOTSTRAP_ADDR: known,
                }
                return await self._both(request, prefill, decode + path, body, params, room)
            pre = asyncio.ensure_future(self._prefill(prefill, path, body, room))
            try:
                params = await asyncio.shield(pre)
            except asyncio.CancelledError:  # the client left while prefill ran
                self._release_later(pre, decode + path, body)
                raise
            return await self._decode(request, decode + path, body, params)
        except UpstreamError as exc:
            self.failed += 1
            return _error(exc.status, str(exc), exc.kind)

    def _release_later(self, pre: asyncio.Future[dict[str, Any]], url: str, body: dict[str, Any]) -> None:
        """A client left while prefill ran: let prefill finish, then have decode take the room at once.

        Closing prefill's request would race its end: an abort that arrives after the
        prefill finished leaves a room open with no decode coming, its blocks held until
        the Bootstrapping deadline.  Instead prefill finishes and decode takes the KV for
        one token, whose answer nobody reads: both engines let go within a step.
        """

        async def release() -> None:
            with contextlib.suppress(Exception):
                params = await pre
                assert self._session is not None
                req = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": params}
                async with self._session.post(url, json=req) as resp:
                    await resp.read()

        task = asyncio.ensure_future(release())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _both(
        self,
        request: web.Request,
        prefill: str,
        url: str,
        body: dict[str, Any],
        params: dict[str, Any],
        room: int,
    ) -> web.StreamResponse:
        """Concurrent order: prefill and decode at once; a prefill failure cancels decode's request."""
        pre = asyncio.ensure_future(self._prefill(prefill, request.path, body, room))
        dec = asyncio.ensure_future(self._decode(request, url, body, params))
        try:
            done, _ = await asyncio.wait({pre, dec}, return_when=asyncio.FIRST_COMPLETED)
            if pre in done and pre.exception() is not None and not dec.done():
                dec.cancel()  # closes decode's request: vLLM aborts it, kvroom fails its room
                with contextlib.suppress(BaseException):
                    await dec
                raise pre.exception()  # type: ignore[misc]
            return await dec
        finally:
            for task in (pre, dec):
                if not task.done():
                    task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _decode(
        self, request: web.Request, url: str, body: dict[str, Any], params: dict[str, Any]
    ) -> web.StreamResponse:
        assert self._session is not None
        req = {**body, "kv_transfer_params": params}
        room = int(params.get(ROOM, -1))
        self._trace(room, "decode_sent")
        try:
            async with self._session.post(url, json=req) as resp:
                self._trace(room, "decode_headers")
                if resp.status != 200 or not body.get("stream"):
                    data = await resp.read()
                    if resp.status == 200:
                        self.served += 1
                    else:
                        self.failed += 1
                    return web.Response(body=data, status=resp.status, content_type="application/json")
                out = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
                await out.prepare(request)
                try:
                    async for chunk in resp.content.iter_any():
                        await out.write(chunk)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    self.failed += 1
                    event = {"error": {"message": f"decode {url} broke off: {exc}", "type": "upstream_error"}}
                    await out.write(f"data: {json.dumps(event)}\n\n".encode())
                    return out
                self.served += 1
                await out.write_eof()
                return out
        except aiohttp.ClientError as exc:
            raise UpstreamError(502, f"decode {url} unreachable: {exc}", "upstream_unavailable") from None
        except asyncio.TimeoutError:
            raise UpstreamError(504, f"decode {url} did not answer in time", "upstream_timeout") from None

    async def health(self, _request: web.Request) -> web.Response:
        """200 while the proxy runs; ``served`` / ``failed`` counts and the learned addresses."""
        data = {"prefill": self.prefill, "decode": self.decode, "order": self.order}
        return web.json_response(
            {**data, "served": self.served, "failed": self.failed, "bootstrap": self.bootstrap}
        )


def build_app(proxy: Proxy) -> web.Application:
    """The aiohttp application serving ``proxy``."""
    app = web.Application(client_max_size=64 << 20)
    for route in _ROUTES:
        app.router.add_post(route, proxy.handle)
    app.router.add_get("/health", proxy.health)
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.close)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``--prefill URL... --decode URL... [--host H] [--port P] [--order ...]``."""
    parser = argparse.ArgumentParser(prog="python -m kvroom.integrations.vllm.proxy", description=__doc__)
    parser.add_argument("--prefill", nargs="+", required=True, help="prefill servers' base URLs")
    parser.add_argument("--decode", nargs="+", required=True, help="decode servers' base URLs")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--order",
        choices=("sequential", "concurrent"),
        default=None,
        help="concurrent (kvroom's default): decode's request leaves beside prefill's; sequential: after "
        "prefill's answer (NixlConnector's only order)",
    )
    parser.add_argument("--connector", choices=("kvroom", "nixl"), default="kvroom")
    parser.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to reach an upstream")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for one upstream request")
    parser.add_argument("--trace", action="store_true", help="JSON lines of each request's steps on stderr")
    args = parser.parse_args(argv)
    proxy = Proxy(
        args.prefill,
        args.decode,
        order=args.order,
        connector=args.connector,
        connect_timeout=args.connect_timeout,
        timeout=args.timeout,
        trace=args.trace,
    )
    # a client that leaves cancels its handler (aiohttp >= 3.9 no longer does so by default): its
    # decode request is closed at once, or, mid-prefill, handed to _release_later
    web.run_app(build_app(proxy), host=args.host, port=args.port, print=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
