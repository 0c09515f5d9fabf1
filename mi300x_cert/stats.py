"""Appendix A and B tables of the reference MI300X validation report, computed from raw result rows.

Appendix A: per-image latency (``per_image_s`` = batch latency / batch size). Appendix B: batch
latency (``latency_s``) and batch latency with overhead (``latency_overhead_s``: + input preparation
and output post-processing, see docs/experiments.md). Each table: mean, median, sample standard
deviation (ddof=1; empty when a cell has a single batch), min, max over every measured batch of
every process and repetition of that process count × batch config (warm-up batches and failed rows
excluded). Shape as in the report: index ``N-processes``, first column ``Accelerator``, then the
batch configs in the report's order (``1x512 … 128x4``; others after them by batch size).

pandas is imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import REPORT_BATCH_CONFIGS, parse_batch_config

__all__ = ["STATS", "TABLES", "TABLE_TITLES", "measured_rows", "order_batch_configs", "appendix_tables",
           "long_table", "write_tables", "truthy", "problems_path", "write_problems", "read_table", "read_problems"]

STATS = ("mean", "median", "std", "min", "max")
_STAT_WORDS = {"mean": "Mean", "median": "Median", "std": "Standard Deviation", "min": "Minimum", "max": "Maximum"}

# table name → (row column, report title)
TABLES: dict[str, tuple[str, str]] = {}
for _s in STATS:
    TABLES[f"appendix_a_{_s}"] = ("per_image_s", f"{_STAT_WORDS[_s]} of Normalized Inference Latency per Image Across Runs")
for _s in STATS:
    TABLES[f"appendix_b_{_s}"] = ("latency_s", f"{_STAT_WORDS[_s]} Batch Inference Latency (Seconds) Across Runs")
    TABLES[f"appendix_b_{_s}_overhead"] = (
        "latency_overhead_s", f"{_STAT_WORDS[_s]} Batch Inference Latency with Overhead (Seconds) Across Runs")
TABLE_TITLES = {k: v[1] for k, v in TABLES.items()}


def order_batch_configs(labels: list[str]) -> list[str]:
    """The report's order (1x512 … 128x4) first, then the others by batch size and count."""
    seen = list(dict.fromkeys(str(x) for x in labels))
    known = [b for b in REPORT_BATCH_CONFIGS if b in seen]
    rest = sorted((b for b in seen if b not in REPORT_BATCH_CONFIGS),
                  key=lambda b: (parse_batch_config(b).batch_size, parse_batch_config(b).n_batches))
    return known + rest


def truthy(v: Any) -> bool:
    """A CSV cell as a flag: ``True``/``1``/``yes``/``y``/``t`` (any case) or a true number; empty,
    NaN and NA are false."""
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "y", "t")
    try:
        import math

        return bool(v) and not (isinstance(v, float) and math.isnan(v))
    except Exception:  # pandas.NA and other values without a truth value
        return False


def measured_rows(rows: Any) -> Any:
    """Rows that count: not warm-up, status ok (a copy)."""
    import pandas as pd

    df = pd.DataFrame(rows).copy()
    if "warmup" in df.columns:
        df = df[~df["warmup"].map(truthy)]
    if "status" in df.columns:
        df = df[df["status"].astype(str) == "ok"]
    return df


def appendix_tables(rows: Any, accelerator: str | None = None) -> dict[str, Any]:
    """``{table name: DataFrame}`` for every table in :data:`TABLES` (see module doc).

    ``rows`` is a DataFrame (or list of dicts) with ``process_count``, ``batch_config``,
    ``per_image_s``, ``latency_s``, ``latency_overhead_s``; ``accelerator`` fills the Accelerator
    column (default: the rows' ``accelerator`` column if any, else "unknown").
    """
    import pandas as pd

    df = measured_rows(rows)
    if accelerator is None:
        accelerator = str(df["accelerator"].dropna().iloc[0]) if "accelerator" in df.columns and df["accelerator"].notna().any() else "unknown"
    out: dict[str, Any] = {}
    if df.empty:
        for name in TABLES:
            t = pd.DataFrame(columns=["Accelerator"])
            t.index.name = "N-processes"
            out[name] = t
        return out
    df["process_count"] = df["process_count"].astype(int)
    df["batch_config"] = df["batch_config"].astype(str)
    configs = order_batch_configs(list(df["batch_config"]))
    procs = sorted(df["process_count"].unique())
    for name, (col, _title) in TABLES.items():
        stat = name.split("_")[2]
        values = pd.to_numeric(df[col], errors="coerce")
        g = values.groupby([df["process_count"], df["batch_config"]])
        agg = getattr(g, stat)() if stat != "std" else g.std(ddof=1)
        table = agg.unstack("batch_config").reindex(index=procs, columns=configs)
        table.index.name = "N-processes"
        table.columns.name = None
        table.insert(0, "Accelerator", accelerator)
        out[name] = table
    return out


def long_table(rows: Any) -> Any:
    """One row per process count × batch config × metric with count/mean/median/std/min/max."""
    import pandas as pd

    df = measured_rows(rows)
    recs = []
    if not df.empty:
        df["process_count"] = df["process_count"].astype(int)
        for (pc, bc), grp in df.groupby(["process_count", "batch_config"], sort=False):
            for metric in ("per_image_s", "per_image_overhead_s", "latency_s", "latency_overhead_s"):
                if metric not in grp.columns:
                    continue
                v = pd.to_numeric(grp[metric], errors="coerce").dropna()
                recs.append({"process_count": int(pc), "batch_config": str(bc), "metric": metric, "count": int(v.size),
                             "mean": v.mean(), "median": v.median(), "std": v.std(ddof=1), "min": v.min(), "max": v.max()})
    out = pd.DataFrame(recs, columns=["process_count", "batch_config", "metric", "count", "mean", "median", "std", "min", "max"])
    if not out.empty:
        order = {b: i for i, b in enumerate(order_batch_configs(list(out["batch_config"])))}
        out = out.sort_values(["process_count", "batch_config", "metric"], key=lambda s: s.map(order) if s.name == "batch_config" else s)
    return out.reset_index(drop=True)


def write_tables(tables: dict[str, Any], directory: Path) -> list[Path]:
    """Write each table as ``<directory>/<name>.csv`` atomically; return the paths."""
    from .rundir import atomic_write_text

    paths = []
    for name, table in tables.items():
        p = Path(directory) / f"{name}.csv"
        atomic_write_text(p, table.to_csv(index=table.index.name is not None))
        paths.append(p)
    return paths


# ---- an experiment's own tables (written once at finalize; verdicts and the report read them) ----------
def problems_path(table: str) -> str:
    """``stats/x.csv`` → ``stats/x.problems.json``: what finalize found wrong while computing ``table``."""
    return str(Path(table).with_suffix(".problems.json"))


def write_problems(root: Path | str, table: str, problems: list[str]) -> str:
    """Write the findings of computing ``table`` (a JSON list, empty when none) next to it; return its path
    relative to the run directory. Always written, so a missing file is itself a finding."""
    import json

    from .rundir import atomic_write_text

    rel = problems_path(table)
    atomic_write_text(Path(root) / rel, json.dumps(list(problems), indent=1) + "\n")
    return rel


def read_table(root: Path | str, table: str, problems: list[str], experiment: str) -> Any:
    """``<root>/<table>`` as a DataFrame, else None with a problem naming the table (fail closed)."""
    import pandas as pd

    p = Path(root) / table
    if not p.is_file():
        problems.append(f"missing table {table} (written when the {experiment} experiment is finalized; "
                        f"`mi300x-cert finalize RUN_DIR` computes it for a run finalized by an earlier version)")
        return None
    try:
        return pd.read_csv(p, low_memory=False)
    except Exception as e:  # an empty or corrupt table is a missing metric
        problems.append(f"unreadable table {table}: {type(e).__name__}: {e}")
        return None


def read_problems(root: Path | str, table: str, problems: list[str], experiment: str) -> None:
    """Add the findings finalize recorded for ``table`` to ``problems`` (a missing or unreadable
    findings file is one itself)."""
    import json

    rel = problems_path(table)
    try:
        found = json.loads((Path(root) / rel).read_text())
        if not isinstance(found, list):
            raise ValueError("not a list")
    except (OSError, ValueError) as e:
        problems.append(f"missing or unreadable {rel} (the findings of the {experiment} experiment's finalize): "
                        f"{type(e).__name__}")
        return
    problems.extend(str(x) for x in found)
