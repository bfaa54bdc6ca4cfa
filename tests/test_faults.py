"""NIXL exceptions map onto kvroom's transport errors; nothing else does."""

from __future__ import annotations

import pytest

from kvroom.errors import BackendError, PeerLostError, TransferCancelledError
from kvroom.transport.faults import classify, is_nixl_error

nixl_bindings = pytest.importorskip("nixl._bindings")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("nixlRemoteDisconnectError", PeerLostError),
        ("nixlNotFoundError", PeerLostError),
        ("nixlCancelledError", TransferCancelledError),
        ("nixlBackendError", BackendError),
        ("nixlInvalidParamError", BackendError),
    ],
)
def test_nixl_errors_are_classified(name: str, expected: type[Exception]) -> None:
    exc = getattr(nixl_bindings, name)("NIXL_ERR_X")
    error = classify(exc, "WRITE room 7 to decode-a")
    assert isinstance(error, expected)
    assert "WRITE room 7 to decode-a" in str(error) and name in str(error)
    assert error.__cause__ is exc


def test_programming_errors_are_not_classified() -> None:
    assert classify(TypeError("bug"), "x") is None
    assert not is_nixl_error(KeyError("k"))
