"""Every call SGLang's schedulers make on kvroom's classes exists; those made on decode's own schedule work.

:func:`test_kvroom_has_everything_sglangs_schedulers_use_unguarded` reads the
installed SGLang's scheduler sources (``ast``) for each attribute and method
they use on the manager, sender and receiver without a ``hasattr`` /
``getattr(..., default)`` guard, and the keywords they build the bootstrap
server with; a kvroom class lacking one fails it, so the next SGLang release's
additions show up here, not as a crashed scheduler.  The process tests drive
the two decode calls the surface once lacked through SGLang's own methods:
the PD rebootstrap (``_submit_prefill_recompute``) and the prefill DP-rank
lookup on the manager's thread pool (``prefetch_prefill_dp_rank_queries``).
"""

from __future__ import annotations

import ast
import collections
import importlib.util
import inspect
import itertools
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("sglang")

from tests.integrations.sglang import shim

shim.install()

from kvroom.integrations.sglang import conn  # noqa: E402
from tests.integrations.sglang.cluster import Cluster, Node  # noqa: E402
from tests.integrations.sglang.node import PAGE_SIZE, TERMINAL  # noqa: E402

SRT = Path(importlib.util.find_spec("sglang").submodule_search_locations[0]) / "srt"  # type: ignore[union-attr,index]
# where SGLang's prefill and decode schedulers live (the backends' own subpackages are not callers)
SCHEDULER_SOURCES = sorted((SRT / "disaggregation").glob("*.py")) + sorted((SRT / "managers").glob("*.py"))
# the names SGLang's scheduler code gives each object; bare aliases only in disaggregation/
ROLES = {
    "kv_manager": ("manager",),
    "kv_mgr": ("manager",),
    "kv_receiver": ("receiver",),
    "disagg_kv_sender": ("sender",),
}
# bare local names, read in disaggregation/ only (``poller``: poll_and_all_reduce's senders and receivers)
ALIASES = {"sender": ("sender",), "receiver": ("receiver",), "poller": ("sender", "receiver")}
CLASSES: dict[str, type] = {
    "manager": conn.KvroomKVManager,
    "sender": conn.KvroomKVSender,
    "receiver": conn.KvroomKVReceiver,
}


def _roles(node: ast.AST, aliases: bool) -> tuple[str, ...]:
    if isinstance(node, ast.Attribute):
        return ROLES.get(node.attr, ())
    if isinstance(node, ast.Name):
        return ROLES.get(node.id) or (ALIASES.get(node.id, ()) if aliases else ())
    return ()


def unguarded_uses(sources: list[Path]) -> dict[tuple[str, str], list[str]]:
    """(role, attribute) -> ``file:line`` of each read SGLang makes without a guard in that file."""
    uses: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for path in sources:
        tree = ast.parse(path.read_text())
        aliases = path.parent.name == "disaggregation"
        guarded: set[tuple[str, str]] = set()
        reads: list[tuple[str, str, int]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 2:
                name, targets = node.args[1], _roles(node.args[0], aliases)
                if node.func.id in ("hasattr", "getattr") and isinstance(name, ast.Constant):
                    safe = node.func.id == "hasattr" or len(node.args) > 2 or bool(node.keywords)
                    for target in targets:
                        if safe:
                            guarded.add((target, name.value))
                        else:
                            reads.append((target, name.value, node.lineno))
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                reads.extend((target, node.attr, node.lineno) for target in _roles(node.value, aliases))
        for target, attr, line in reads:
            if (target, attr) not in guarded:
                uses[(target, attr)].append(f"{path.relative_to(SRT)}:{line}")
    return uses


def _instance_attributes(cls: type) -> set[str]:
    """``self.X = ...`` targets in the kvroom classes of ``cls``'s MRO."""
    names = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("kvroom"):
            for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(klass)))):
                stored = isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                if stored and isinstance(node.value, ast.Name) and node.value.id == "self":  # type: ignore[attr-defined]
                    names.add(node.attr)  # type: ignore[attr-defined]
    return names


def provides(cls: type, attr: str) -> bool:
    """``cls`` answers ``attr``: its own, or SGLang's base class's when that does not just refuse."""
    if attr in _instance_attributes(cls):
        return True
    for klass in cls.__mro__:
        if attr in vars(klass):
            value = vars(klass)[attr]
            if klass.__module__.startswith("kvroom") or not inspect.isfunction(value):
                return True
            source = inspect.getsource(value)
            return "NotImplementedError" not in source and not getattr(value, "__isabstractmethod__", False)
    return False


def test_the_scan_finds_what_sglangs_schedulers_call() -> None:
    """The scan is not vacuous: the calls every backend serves are among the uses it finds."""
    uses = unguarded_uses(SCHEDULER_SOURCES)
    for expected in [
        ("sender", "send"),
        ("sender", "poll"),
        ("receiver", "poll_pp_consensus"),
        ("receiver", "send_metadata"),
        ("manager", "submit_prefill_recompute"),
        ("manager", "_ensure_prefill_recompute_executor"),
    ]:
        assert expected in uses, expected
    assert len(uses) > 30


def test_a_missing_method_is_reported() -> None:
    """A class without one of the used names fails the check, and a refusing base method counts as missing."""

    class Bare(conn.BaseKVSender):  # type: ignore[misc]
        pass

    assert not provides(Bare, "send")  # abstract in SGLang's base
    assert not provides(Bare, "mark_prefill_complete")  # raises NotImplementedError there
    assert provides(Bare, "get_max_transfer_tokens")  # SGLang's default answer is a real one
    assert not provides(conn.KvroomKVManager, "no_such_call")


def test_kvroom_has_everything_sglangs_schedulers_use_unguarded() -> None:
    uses = unguarded_uses(SCHEDULER_SOURCES)
    missing = {
        f"{CLASSES[role].__name__}.{attr}": where[:3]
        for (role, attr), where in sorted(uses.items())
        if not provides(CLASSES[role], attr)
    }
    assert not missing, f"SGLang's schedulers use these without a guard and kvroom lacks them: {missing}"


def test_the_bootstrap_server_takes_the_arguments_sglang_builds_it_with() -> None:
    calls = []
    for path in SCHEDULER_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "kv_bootstrap_server_class":
                calls.append(node)
    assert calls, "SGLang builds its bootstrap server somewhere"
    signature = inspect.signature(conn.KvroomKVBootstrapServer)
    for call in calls:
        keywords = {k.arg: None for k in call.keywords if k.arg}
        signature.bind(*([None] * len(call.args)), **keywords)  # raises TypeError on a mismatch


# -- the calls SGLang's decode makes on its own schedule, through its own methods -----------------

ROOMS = itertools.count(5001)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Node, Node, str]]:
    env = {"SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK": "1"}  # only matters with DP > 1
    cluster = Cluster(env=env)
    try:
        yield cluster.prefill[0], cluster.decodes[0][0], cluster.addr
    finally:
        cluster.close()


def _first_transfer(prefill: Node, decode: Node, addr: str, dst: list[int]) -> int:
    room = next(ROOMS)
    decode.call("receiver", room, addr, dst, 3)
    prefill.call("sender", room)
    assert prefill.call("wait", [room], ["WaitingForInput"], 30) == {room: "WaitingForInput"}
    prefill.call("begin", room, len(dst) * PAGE_SIZE, 2)
    prefill.call("chunk", room, [10 + i for i in range(len(dst))], True)
    for node in (prefill, decode):
        assert node.call("wait", [room], list(TERMINAL), 30) == {room: "Success"}
        node.call("clear", room)
    return room


def test_a_rebootstrap_has_prefill_recompute_the_room_into_the_new_receiver(
    pair: tuple[Node, Node, str],
) -> None:
    prefill, decode, addr = pair
    dst = [40, 41, 42]
    room = _first_transfer(prefill, decode, addr, dst)  # the request ran, then decode retracted it
    tokens = len(dst) * PAGE_SIZE
    decode.call("rebootstrap", room, addr, dst, 3, tokens, "rid-a")
    for node in (prefill, decode):
        assert node.call("wait", [room], list(TERMINAL), 30) == {room: "Success"}
    assert decode.call("holds", dst, [1, 2, 3])  # the recomputed pages, not the first transfer's
    [call] = [c for c in prefill.call("generated") if c["rid"] == "rid-a"]
    assert call["path"] == "/generate" and call["bootstrap_room"] == room
    assert len(call["input_ids"]) == tokens and call["sampling_params"]["max_new_tokens"] == 1
    for node in (prefill, decode):
        node.call("clear", room)
        assert node.call("footprint", room) == []


def test_a_refused_rebootstrap_fails_its_room_with_the_prefills_answer(pair: tuple[Node, Node, str]) -> None:
    prefill, decode, addr = pair
    dst = [43, 44]
    room = _first_transfer(prefill, decode, addr, dst)
    decode.call("rebootstrap", room, addr, dst, 3, len(dst) * PAGE_SIZE, "refuse-b")
    assert decode.call("wait", [room], list(TERMINAL), 30) == {room: "Failed"}
    failure = decode.call("failure", room)
    assert failure["type"] == "KVTransferError", failure
    assert "rebootstrap" in failure["reason"] and "503" in failure["reason"], failure
    decode.call("clear", room)
    assert decode.call("footprint", room) == []


def test_decode_asks_for_a_rooms_prefill_dp_rank_on_the_managers_thread_pool(
    pair: tuple[Node, Node, str],
) -> None:
    prefill, decode, addr = pair
    room = next(ROOMS)
    prefill.call("register_rooms_dp_rank", room)  # a DP prefill's sender registers where the room is
    assert decode.call("query_dp_ranks", addr, [room, room + 10_000]) == {str(room): 0}
    prefill.call("abort", room)
    prefill.call("clear", room)
