"""What authentication costs on the control plane: handshakes and small-message round trips.

Three figures, each without keys and with CURVE keys (``ManagerConfig.keys``):

* kvroom handshake: a fresh decode manager's first room, from ``send_metadata``
  to the welcome (connect, CURVE + ZAP when keyed, hello with NIXL metadata,
  ``add_remote_agent`` on both sides); medians over ``--reps`` fresh decodes.
* ZMQ connect: a DEALER connecting to a ROUTER and its first round trip (the
  CURVE handshake alone, without kvroom or NIXL).
* round trip: ping/pong of kvroom control frames over one connected pair
  (CURVE encrypts every frame).

    python benchmarks/handshake.py [--reps N] [--pings N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import structlog
import torch
import zmq

from kvroom import CurveKeys, KVManager, KVPool, KVReceiver, ManagerConfig
from kvroom.transport.auth import ServerAuth
from kvroom.transport.codec import encode

_QUIET = structlog.wrap_logger(structlog.PrintLogger(open(os.devnull, "w")))  # noqa: SIM115


def _pool() -> KVPool:
    return KVPool([torch.zeros(64, 4096, dtype=torch.uint8)], torch.zeros(8, 64, dtype=torch.uint8))


def _keys() -> tuple[CurveKeys, CurveKeys]:
    p_pub, p_sec = zmq.curve_keypair()
    d_pub, d_sec = zmq.curve_keypair()
    return CurveKeys(p_pub, p_sec, frozenset({d_pub})), CurveKeys(d_pub, d_sec, frozenset({p_pub}))


def kvroom_handshakes(reps: int, keyed: bool) -> list[float]:
    """Seconds from a fresh decode's first page list to the prefill's welcome, ``reps`` times."""
    pk, dk = _keys() if keyed else (None, None)
    out = []
    with KVManager("prefill", _pool(), config=ManagerConfig(keys=pk), audit=False, logger=_QUIET) as p:
        for i in range(reps):
            with KVManager("decode", _pool(), config=ManagerConfig(keys=dk), audit=False, logger=_QUIET) as d:
                rx = KVReceiver(d, p.bootstrap_addr, i)
                rx.init()
                start = time.perf_counter()
                rx.send_metadata([0])
                while True:
                    peer = d.side.peers.get(p.bootstrap_addr)
                    if peer is not None and peer.agent is not None:
                        break
                    time.sleep(0.0002)
                out.append(time.perf_counter() - start)
                rx.abort()
    return out


def _pair(keyed: bool) -> tuple[zmq.Context[Any], Any, Any, ServerAuth | None, float]:
    """A ROUTER and a DEALER connected, and the seconds the connect + first round trip took."""
    ctx: zmq.Context[Any] = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    auth = None
    if keyed:
        pk, dk = _keys()
        auth = ServerAuth(ctx, pk)
        auth.secure(router)
        dealer.curve_serverkey, dealer.curve_publickey, dealer.curve_secretkey = (
            pk.public,
            dk.public,
            dk.secret,
        )
    port = router.bind_to_random_port("tcp://127.0.0.1")
    start = time.perf_counter()
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send_multipart(encode("ping"))
    ident, *_ = router.recv_multipart()
    router.send_multipart([ident, *encode("pong")])
    dealer.recv_multipart()
    return ctx, router, dealer, auth, time.perf_counter() - start


def zmq_connects(reps: int, keyed: bool) -> list[float]:
    """Seconds of a connect and its first round trip, ``reps`` fresh pairs."""
    out = []
    for _ in range(reps):
        ctx, router, dealer, auth, seconds = _pair(keyed)
        out.append(seconds)
        for sock in (router, dealer):
            sock.close(linger=0)
        if auth is not None:
            auth.close()
        ctx.term()
    return out


def round_trips(pings: int, keyed: bool) -> float:
    """Mean seconds of one ping/pong over a connected pair."""
    ctx, router, dealer, auth, _ = _pair(keyed)
    ping, pong = encode("ping"), encode("pong")
    start = time.perf_counter()
    for _ in range(pings):
        dealer.send_multipart(ping)
        ident, *_ = router.recv_multipart()
        router.send_multipart([ident, *pong])
        dealer.recv_multipart()
    seconds = (time.perf_counter() - start) / pings
    for sock in (router, dealer):
        sock.close(linger=0)
    if auth is not None:
        auth.close()
    ctx.term()
    return seconds


def main() -> None:
    """Measure and print the table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="fresh handshakes of each kind (default 15)")
    parser.add_argument("--pings", type=int, default=5000, help="round trips (default 5000)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out: dict[str, dict[str, float]] = {}
    for keyed in (False, True):
        name = "curve" if keyed else "none"
        out[name] = {
            "kvroom_handshake_ms_p50": statistics.median(kvroom_handshakes(args.reps, keyed)) * 1e3,
            "zmq_connect_ms_p50": statistics.median(zmq_connects(args.reps * 4, keyed)) * 1e3,
            "round_trip_us": round_trips(args.pings, keyed) * 1e6,
        }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{'':28}{'no keys':>10}{'CURVE':>10}{'ratio':>8}")
    for key, label in (
        ("kvroom_handshake_ms_p50", "kvroom handshake, ms p50"),
        ("zmq_connect_ms_p50", "ZMQ connect + 1st RTT, ms"),
        ("round_trip_us", "control round trip, us"),
    ):
        a, b = out["none"][key], out["curve"][key]
        print(f"{label:28}{a:>10.3f}{b:>10.3f}{b / a:>8.2f}")


if __name__ == "__main__":
    main()
