"""The traffic split: weights, stickiness, run-time changes (no Ray)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from fabric.errors import UsageError
from fabric.serve.router import TrafficSplit, parse_weights, sticky_point


def test_weighted_draw_honours_weights_within_tolerance() -> None:
    split = TrafficSplit({"v1": 90, "v2": 10}, seed=1)
    n = 20_000
    counts = Counter(split.choose() for _ in range(n))
    # binomial sd of the v2 share is sqrt(.1 * .9 / n) ~ 0.0021; allow 5 sd
    assert abs(counts["v2"] / n - 0.10) < 0.011


def test_weights_need_not_sum_to_100_and_zero_is_never_chosen() -> None:
    split = TrafficSplit({"a": 1, "b": 3, "c": 0}, seed=2)
    counts = Counter(split.choose() for _ in range(8000))
    assert counts["c"] == 0
    assert abs(counts["b"] / 8000 - 0.75) < 0.03
    assert split.weights == {"a": 25.0, "b": 75.0, "c": 0.0}


def test_single_version_takes_everything() -> None:
    split = TrafficSplit({"only": 1})
    assert {split.choose({"x-user": str(i)}) for i in range(50)} == {"only"}


def test_sticky_header_pins_a_user_to_one_version() -> None:
    split = TrafficSplit({"v1": 50, "v2": 50}, sticky_header="X-User-Id", seed=3)
    for user in ("alice", "bob", "carol", "dave"):
        seen = {split.choose({"x-user-id": user}) for _ in range(30)}
        assert len(seen) == 1
    users = Counter(split.choose({"x-user-id": f"user-{i}"}) for i in range(4000))
    assert abs(users["v1"] / 4000 - 0.5) < 0.04  # hashing spreads users by weight too


def test_requests_without_the_sticky_header_are_drawn_by_weight() -> None:
    split = TrafficSplit({"v1": 50, "v2": 50}, sticky_header="x-user-id", seed=4)
    assert len({split.choose({}) for _ in range(200)}) == 2


def test_sticky_point_is_the_same_in_every_process() -> None:
    code = "from fabric.serve.router import sticky_point; print(repr(sticky_point('alice')))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert float(other) == sticky_point("alice")
    assert 0.0 <= sticky_point("") < 1.0


def test_weight_change_moves_only_the_band_that_changed_hands() -> None:
    split = TrafficSplit({"v1": 90, "v2": 10}, sticky_header="x-user-id")
    users = [f"u{i}" for i in range(3000)]
    before = {u: split.choose({"x-user-id": u}) for u in users}
    split.update({"v1": 80, "v2": 20})
    after = {u: split.choose({"x-user-id": u}) for u in users}
    moved = [u for u in users if before[u] != after[u]]
    assert all(before[u] == "v1" and after[u] == "v2" for u in moved)  # nobody moves v2 -> v1
    assert abs(len(moved) / len(users) - 0.10) < 0.025


def test_update_validates_and_leaves_out_versions_at_zero() -> None:
    split = TrafficSplit({"v1": 50, "v2": 50})
    split.update({"v2": 1})
    assert split.weights == {"v1": 0.0, "v2": 100.0}
    with pytest.raises(UsageError, match="unknown version"):
        split.update({"v3": 1})
    with pytest.raises(UsageError, match="above 0"):
        split.update({"v1": 0, "v2": 0})
    with pytest.raises(UsageError, match=">= 0"):
        split.update({"v1": -1, "v2": 5})
    assert split.weights == {"v1": 0.0, "v2": 100.0}  # failed updates change nothing


def test_parse_weights() -> None:
    assert parse_weights(["v1=90", "v2=10.5"]) == {"v1": 90.0, "v2": 10.5}
    for bad in (["v1"], ["v1=x"], ["=3"], ["v1=-2"], ["v1=1", "v1=2"], ["v1=nan"]):
        with pytest.raises(UsageError):
            parse_weights(bad)
