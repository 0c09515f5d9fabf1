"""Drift of one card: is it slower or hotter than it used to be, or than its SKU across the fleet?

At record time each card row is compared with

* ``previous``: the same serial's newest earlier certification, and
* ``sku_median``: the median over the fleet of the newest row of every other serial of the same SKU
  (only when at least ``min_fleet_cards`` such serials have the metric).

A flag is raised when ``sd_per_image_median_s`` is at least ``slower_pct`` % above the reference,
or ``active_junction_p95_c`` / ``memory_max_c`` at least ``hotter_c`` °C above it. Each flag is
``{metric, against, value, reference, delta, limit}``. A metric the card or the reference lacks
raises no flag (drift is a warning, not a verdict: the verdict is the suites'). Pure Python.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Iterable

__all__ = ["DriftRule", "DRIFT_METRICS", "SLOWER_METRICS", "HOTTER_METRICS", "median_by_metric"]

SLOWER_METRICS = ("sd_per_image_median_s",)
HOTTER_METRICS = ("active_junction_p95_c", "memory_max_c")
DRIFT_METRICS = SLOWER_METRICS + HOTTER_METRICS


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x and x not in (float("inf"), float("-inf")) else None


@dataclass(frozen=True)
class DriftRule:
    """Thresholds of the drift warning (``drift:`` in the fleet file overrides them)."""

    slower_pct: float = 5.0
    hotter_c: float = 5.0
    min_fleet_cards: int = 3

    def __post_init__(self) -> None:
        for name in ("slower_pct", "hotter_c"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"drift.{name} must be a positive number, got {v!r}")
        if isinstance(self.min_fleet_cards, bool) or not isinstance(self.min_fleet_cards, int) or self.min_fleet_cards < 1:
            raise ValueError(f"drift.min_fleet_cards must be a positive integer, got {self.min_fleet_cards!r}")

    @classmethod
    def from_mapping(cls, data: dict | None) -> "DriftRule":
        if not data:
            return cls()
        unknown = set(data) - {"slower_pct", "hotter_c", "min_fleet_cards"}
        if unknown:
            raise ValueError(f"drift: unknown key(s) {', '.join(sorted(unknown))}")
        return cls(**data)

    def as_dict(self) -> dict:
        return asdict(self)

    def compare(self, row: dict, reference: dict | None, against: str) -> list[dict]:
        """Flags of ``row`` against one reference row (or metric → value mapping)."""
        if not reference:
            return []
        out = []
        for metric in DRIFT_METRICS:
            value, ref = _num(row.get(metric)), _num(reference.get(metric))
            if value is None or ref is None:
                continue
            delta = value - ref
            if metric in SLOWER_METRICS:
                hit = ref > 0 and value >= ref * (1 + self.slower_pct / 100.0)
                limit = f">= {self.slower_pct:g}% slower"
            else:
                hit = delta >= self.hotter_c
                limit = f">= {self.hotter_c:g} °C hotter"
            if hit:
                out.append({"metric": metric, "against": against, "value": value, "reference": ref,
                            "delta": round(delta, 6), "limit": limit})
        return out

    def flags(self, row: dict, previous: dict | None, sku_median: dict | None) -> list[dict]:
        return self.compare(row, previous, "previous") + self.compare(row, sku_median, "sku_median")


def median_by_metric(rows: Iterable[dict], min_count: int) -> dict[str, float]:
    """metric → median over the rows that have it (metrics with fewer than ``min_count`` values left out)."""
    values: dict[str, list[float]] = {m: [] for m in DRIFT_METRICS}
    for r in rows:
        for m in DRIFT_METRICS:
            x = _num(r.get(m))
            if x is not None:
                values[m].append(x)
    return {m: statistics.median(v) for m, v in values.items() if len(v) >= max(1, min_count)}
