"""Descriptor building: runs, layer-major rows, and page validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvroom.node.prefill import Notif, notif_message, parse_notif
from kvroom.transport.descriptors import page_runs, row_descriptors, run_descriptors, validate_pages
from kvroom.transport.notif import mark_commits


def test_runs_break_where_either_side_breaks() -> None:
    src = np.array([0, 1, 2, 5, 6, 7, 8])
    dst = np.array([10, 11, 20, 21, 22, 23, 30])
    s, d, n = page_runs(src, dst)
    assert s.tolist() == [0, 2, 5, 8] and d.tolist() == [10, 20, 21, 30] and n.tolist() == [2, 1, 3, 1]


def test_rows_are_layer_major_with_addresses_and_lengths() -> None:
    rows = run_descriptors([1000, 5000], 10, np.array([0, 3]), np.array([2, 1]), device=0)
    assert rows.tolist() == [[1000, 20, 0], [1030, 10, 0], [5000, 20, 0], [5030, 10, 0]]


def test_head_slice_rows_are_one_per_layer_page_and_token() -> None:
    # pages of 2 tokens x 4 heads x 8 bytes; heads 1..2 of pages 3 and 0, two layers
    rows = row_descriptors([1000, 9000], 64, np.array([3, 0]), rows=2, row_bytes=32, offset=8, length=16)
    assert rows.tolist() == [
        [1000 + 3 * 64 + 8, 16, 0],
        [1000 + 3 * 64 + 32 + 8, 16, 0],
        [1000 + 8, 16, 0],
        [1000 + 32 + 8, 16, 0],
        [9000 + 3 * 64 + 8, 16, 0],
        [9000 + 3 * 64 + 32 + 8, 16, 0],
        [9000 + 8, 16, 0],
        [9000 + 32 + 8, 16, 0],
    ]


@pytest.mark.parametrize(
    "raw",
    [b"kvr1:1:0:1:1", b"kvr2:1:0:0:1", b"kvr2:-1:0:0:1:1", b"kvr2:1:0:0:1:4", b"\xff", b"kvr2:a:0:0:1:1"],
)
def test_malformed_notifications_are_ignored(raw: bytes) -> None:
    assert parse_notif(raw) is None


@pytest.mark.parametrize(("last", "commit"), [(False, False), (True, False), (False, True), (True, True)])
def test_notifications_round_trip(last: bool, commit: bool) -> None:
    assert parse_notif(notif_message(7, 3, 16, 4, last, commit)) == Notif(7, 3, 16, 4, last, commit)
    assert parse_notif(notif_message(7, 3, 16, 4, last)) == Notif(7, 3, 16, 4, last, False)


@given(st.lists(st.integers(0, 200), unique=True, max_size=60), st.randoms())
def test_runs_cover_exactly_the_page_pairs(pages: list[int], rnd: object) -> None:
    src = np.array(pages, dtype=np.int64)
    dst = np.array(sorted(pages), dtype=np.int64)
    s, d, n = page_runs(src, dst)
    rebuilt = [(int(a) + k, int(b) + k) for a, b, m in zip(s, d, n, strict=True) for k in range(int(m))]
    assert rebuilt == list(zip(src.tolist(), dst.tolist(), strict=True))


@pytest.mark.parametrize(
    ("pages", "error", "match"),
    [
        ([0, -1], ValueError, "negative page index -1"),
        ([0, 64], ValueError, "page index 64 out of range"),
        ([3, 3], ValueError, "duplicate page indices"),
        ([[1, 2]], ValueError, "one-dimensional"),
        ([1.0, 2.0], TypeError, "must be integers"),
        (torch.tensor([1.5]), TypeError, "must be integers"),
    ],
)
def test_bad_page_indices_are_named(pages: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        validate_pages(pages, 64, "room 1")


def test_valid_pages_from_torch_and_lists() -> None:
    assert validate_pages(torch.tensor([3, 1]), 64, "r").tolist() == [3, 1]
    assert validate_pages([], 64, "r").size == 0


@pytest.mark.parametrize("size", [2, 511, 512, 513, 5000])
def test_duplicates_are_found_in_short_and_long_page_lists(size: int) -> None:
    # short lists are checked with a set, long ones with np.unique: both must see a repeat anywhere
    pages = np.arange(size, dtype=np.int64)
    assert validate_pages(pages, size, "r").size == size
    for i, j in ((0, size - 1), (size // 2, size // 2 - 1)):
        bad = pages.copy()
        bad[i] = bad[j]
        with pytest.raises(ValueError, match="duplicate page indices"):
            validate_pages(bad, size, "r")


def test_marking_commits_changes_only_the_named_notifications() -> None:
    joined = b";".join(notif_message(r, s, 0, 2, s == 1) for r, s in [(7, 0), (7, 1), (8, 0)])
    marked = [parse_notif(part) for part in mark_commits(joined, [1]).split(b";")]
    assert marked == [Notif(7, 0, 0, 2, False), Notif(7, 1, 0, 2, True, True), Notif(8, 0, 0, 2, False)]
    assert mark_commits(joined, []) == joined
