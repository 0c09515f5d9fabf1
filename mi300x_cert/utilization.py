"""Utilization: each workload's achieved rate as a fraction of the same run's measured ceiling.

    write_utilization(run_dir) -> list of rows   stats/utilization.csv and stats/utilization.json

Each experiment plugin contributes its achieved rates (``Experiment.utilization_rates``: from its own
``stats/`` tables and the work per item its workload counted, ``conditions.json``); the plugin that
measures the card's limits contributes the ceilings (``utilization_ceilings``: matrix TFLOP/s, HBM
GB/s per card). Computed once, when the run finishes; the report, the signed statement and the
registry's history read this table. A rate without a measured ceiling (the ceilings experiment
disabled, or a card it did not measure) has no fraction and says why — never a guess.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

__all__ = ["write_utilization", "read_utilization", "COLUMNS", "TABLE", "TABLE_JSON"]

TABLE = "stats/utilization.csv"
TABLE_JSON = "stats/utilization.json"
COLUMNS = ["workload", "case", "cards", "what", "achieved", "unit", "ceiling", "ceiling_metric", "fraction", "note"]


def _ceilings(run_dir: Path) -> dict[int, dict[str, float]]:
    from .experiments import all_experiments

    out: dict[int, dict[str, float]] = {}
    for exp in all_experiments():
        fn = getattr(exp, "utilization_ceilings", None)
        if fn is not None:
            out.update(fn(run_dir))
    return out


def write_utilization(run_dir: str | Path) -> list[dict]:
    """Compute and write the utilization table of a run (idempotent)."""
    import pandas as pd

    from .experiments import all_experiments
    from .rundir import atomic_write_json, atomic_write_text

    root = Path(run_dir)
    ceilings = _ceilings(root)
    rows: list[dict] = []
    for exp in all_experiments():
        try:
            rates = exp.utilization_rates(root)
        except Exception as e:  # a table that cannot be read: say so in the row
            rates = [{"workload": exp.name, "what": "?", "note": f"rates unreadable: {type(e).__name__}: {e}"}]
        for r in rates:
            metric = r.get("ceiling_metric")
            vals = [ceilings.get(int(c), {}).get(metric) for c in r.get("cards") or []]
            vals = [v for v in vals if v is not None and v == v]
            ceiling = statistics.median(vals) if vals else None
            achieved = r.get("achieved")
            note = r.get("note") or ("" if ceiling else "no measured ceiling for these cards in this run")
            rows.append({**{c: None for c in COLUMNS}, **r, "cards": " ".join(str(c) for c in r.get("cards") or []),
                         "ceiling": ceiling, "fraction": (achieved / ceiling) if achieved and ceiling else None,
                         "note": note})
    atomic_write_text(root / TABLE, pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False))
    atomic_write_json(root / TABLE_JSON, rows)
    return rows


def read_utilization(run_dir: str | Path) -> list[dict] | None:
    try:
        return json.loads((Path(run_dir) / TABLE_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def workload_work(run_dir: Path, experiment: str) -> dict[str, Any]:
    """The work per item the experiment's workload counted (``conditions.json``), or {}."""
    try:
        conds = json.loads((run_dir / "conditions.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    entry = (conds.get("experiments") or {}).get(experiment) or {}
    return dict((entry.get("workload") or {}).get("work") or {})
