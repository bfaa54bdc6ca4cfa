"""SGLang's PD rebootstrap on decode: a retracted request's KV recomputed by its prefill.

SGLang's decode calls two things on its manager on its own schedule, unguarded:
:meth:`PrefillRecompute.submit_prefill_recompute` (under the ``prefill_complete``
allocation policy a retracted request is recomputed by its prefill into the
same room: ``POST /generate`` to the HTTP port each prefill rank registers with
the bootstrap server, sent from a thread pool so the scheduler's loop never
waits on HTTP; no URL, an error status or no answer fails the receiver's room
with that reason) and :meth:`PrefillRecompute._ensure_prefill_recompute_executor`
(that thread pool, which SGLang's decode also uses for its prefill DP-rank
lookups).  :class:`PrefillRecompute` is the part of
:class:`~kvroom.integrations.sglang.manager.KvroomKVManager` that does this.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

__all__ = ["PrefillRecompute"]


class PrefillRecompute:
    """Recompute requests and their thread pool, for the SGLang manager (decode)."""

    kv_args: Any
    attn_tp_rank: int
    prefill_info_table: dict[str, Any]
    waiting_timeout: float | None
    _prefill_recompute_executor: ThreadPoolExecutor | None
    _executor_lock: threading.Lock

    def _ensure_prefill_recompute_executor(self) -> ThreadPoolExecutor:
        """The thread pool SGLang's decode runs its bootstrap-server lookups and recomputes on (lazy).

        ``SGLANG_DISAGGREGATION_THREAD_POOL_SIZE`` threads (16 when unset), as SGLang's
        own backends; shut down by :meth:`close`.
        """
        with self._executor_lock:
            if self._prefill_recompute_executor is None:
                workers = int(os.environ.get("SGLANG_DISAGGREGATION_THREAD_POOL_SIZE") or 16)
                self._prefill_recompute_executor = ThreadPoolExecutor(
                    max_workers=max(1, workers), thread_name_prefix="kvroom-prefill-recompute"
                )
            return self._prefill_recompute_executor

    def prefill_http_url(self, bootstrap_addr: str) -> str | None:
        """``http://host:port`` of a prefill's HTTP API (bootstrap host, the port its ranks registered)."""
        info = self.prefill_info_table.get(bootstrap_addr)
        port = getattr(info, "prefill_http_port", None)
        if port is None:
            return None
        host = bootstrap_addr.rsplit(":", 1)[0]
        return f"http://{host}:{int(port)}"

    def submit_prefill_recompute(self, kv_receiver: Any, payload: dict[str, Any]) -> None:
        """SGLang's PD rebootstrap: ask the prefill to recompute a retracted request's KV into its room.

        The decode scheduler calls this on every rank of the request's group; one
        ``POST /generate`` suffices (the prefill serves every decode rank from it),
        so only the group's first rank sends it, from the thread pool: the
        scheduler's loop never waits on HTTP.  The prefill's room for the same
        id then sends the recomputed pages to the receiver that already sent its
        page list.  No URL, an error status or no answer fails the receiver's room
        with that reason.
        """
        if self.attn_tp_rank != 0 or int(getattr(self.kv_args, "pp_rank", 0) or 0) != 0:
            return
        url = self.prefill_http_url(kv_receiver.bootstrap_addr)
        if url is None:
            kv_receiver.fail(
                f"PD rebootstrap: prefill at {kv_receiver.bootstrap_addr} registered no HTTP port to "
                "recompute the request on"
            )
            return
        self._ensure_prefill_recompute_executor().submit(self._recompute, kv_receiver, url, dict(payload))

    def _recompute(self, kv_receiver: Any, url: str, payload: dict[str, Any]) -> None:
        rid = payload.get("rid")
        try:
            response = requests.post(f"{url}/generate", json=payload, timeout=self.waiting_timeout)
        except requests.RequestException as exc:
            kv_receiver.fail(f"PD rebootstrap of rid={rid}: POST {url}/generate failed: {exc}")
            return
        if response.status_code >= 400:
            status, text = response.status_code, response.text[:200]
            kv_receiver.fail(f"PD rebootstrap of rid={rid}: {url}/generate answered {status}: {text}")
