"""The traffic split: several model versions behind one endpoint, chosen per request by weight.

Open-source Ray Serve has no traffic split of its own. Each replica holds a :class:`TrafficSplit`;
new weights arrive through the deployment's ``user_config`` (Serve calls ``reconfigure`` on live
replicas, no restart), so in-flight requests finish on the version they were given.

Sticky routing hashes the value of a request header onto [0, 1) with a hash that is the same in every
process (Python's ``hash`` is salted per process), then walks the cumulative weights in a fixed version
order: every replica sends a user to the same version, and moving weight from one version to another
only moves the users in the band that changed hands.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Iterable, Mapping

from fabric.errors import UsageError

_SCALE = float(1 << 64)


def sticky_point(value: str) -> float:
    """A stable point in [0, 1) for a sticky key (same in every process and every run)."""
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def parse_weights(items: Iterable[str]) -> dict[str, float]:
    """``["v1=90", "v2=10"]`` -> ``{"v1": 90.0, "v2": 10.0}``.

    Raises:
        UsageError: an item is not ``name=weight`` with a number >= 0, or a name repeats.
    """
    out: dict[str, float] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        try:
            weight = float(raw)
        except ValueError:
            weight = -1.0
        if not sep or not name or not weight >= 0:  # also rejects NaN
            raise UsageError(f"{item!r}: traffic weights look like VERSION=WEIGHT with a number >= 0 (v1=90 v2=10)")
        if name in out:
            raise UsageError(f"version {name!r} is given twice")
        out[name] = weight
    return out


class TrafficSplit:
    """Chooses a version per request: by weight, or by a sticky header when the request carries it.

    Args:
        weights: version -> relative weight (>= 0, at least one > 0). Their order is the band order.
        sticky_header: lower-case header name whose value pins a request's version; None: no stickiness.
        seed: seeds the weighted draw (tests).
    """

    def __init__(self, weights: Mapping[str, float], sticky_header: str | None = None, seed: int | None = None) -> None:
        self.versions = list(weights)
        if not self.versions:
            raise UsageError("a traffic split needs at least one version")
        self.sticky_header = sticky_header.lower() if sticky_header else None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._bounds: list[tuple[float, str]] = []
        self._weights: dict[str, float] = {}
        self.update(weights)

    @property
    def weights(self) -> dict[str, float]:
        """The current weights as percentages of the traffic."""
        total = sum(self._weights.values())
        return {v: round(100.0 * w / total, 6) for v, w in self._weights.items()}

    def check(self, weights: Mapping[str, float]) -> dict[str, float]:
        """Validate new weights against the known versions; versions left out get weight 0.

        Raises:
            UsageError: an unknown version, a negative weight, or all weights 0.
        """
        unknown = [v for v in weights if v not in self.versions]
        if unknown:
            raise UsageError(
                f"unknown version(s) {', '.join(map(repr, unknown))}; this endpoint serves {', '.join(self.versions)}"
            )
        bad = [f"{v}={w}" for v, w in weights.items() if not (float(w) >= 0)]
        if bad:
            raise UsageError(f"weights must be numbers >= 0: {', '.join(bad)}")
        full = {v: float(weights.get(v, 0.0)) for v in self.versions}
        if sum(full.values()) <= 0:
            raise UsageError("at least one version needs a weight above 0")
        return full

    def update(self, weights: Mapping[str, float]) -> None:
        """Swap in new weights atomically (requests already routed are unaffected)."""
        full = self.check(weights)
        total = sum(full.values())
        bounds: list[tuple[float, str]] = []
        acc = 0.0
        for v in self.versions:
            if full[v] > 0:
                acc += full[v] / total
                bounds.append((acc, v))
        bounds[-1] = (1.0, bounds[-1][1])  # no gap at the top from rounding
        with self._lock:
            self._weights, self._bounds = full, bounds

    def pick(self, point: float) -> str:
        """The version whose band holds ``point`` in [0, 1)."""
        bounds = self._bounds
        for upper, version in bounds:
            if point < upper:
                return version
        return bounds[-1][1]

    def choose(self, headers: Mapping[str, str] | None = None) -> str:
        """The version for a request: sticky when it carries the sticky header, else a weighted draw."""
        if len(self._bounds) == 1:
            return self._bounds[0][1]
        if self.sticky_header and headers is not None:
            key = headers.get(self.sticky_header)
            if key:
                return self.pick(sticky_point(key))
        return self.pick(self._rng.random())
