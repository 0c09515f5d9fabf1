"""Build the metric frame each suite checks from a run directory.

One frame per suite, one row per thing a verdict names (a card in a phase, a batch config at a
process count, a case, an interface in a phase, a connection). Every frame has a ``subject``
column, a unique human label of its row (``card 13 active``, ``N=4 8x64``), which GX returns
for each unexpected row so that a failure names what failed.

Fail closed: a missing file or column is recorded in ``Frame.problems`` (each one becomes a
failure of the suite) and the metric columns derived from it are left out of the frame, so the
suite's expectations on them fail as well instead of passing vacuously.

Frames (columns documented in ``docs/verdicts.md``):

* ``thermal``  — per card × role (idle / active / unloaded / cooldown), from the bare-metal
  experiment's ``stats/bare_metal_thermal.csv`` and ``stats/bare_metal_recovery.csv`` (computed at
  finalize from the telemetry and phase markers), + the telemetry/events files of every planned group.
* ``latency``  — the sd-throughput experiment's ``stats/sd_latency.csv`` per process count × batch
  config (kind ``config``) and one row per case status file (kind ``case``).
* ``network``  — external-interface traffic per experiment × interface × phase (kinds
  ``traffic_active`` / ``traffic_other``), one row per socket (``socket``), one ``summary`` row.
* ``whisper``  — per batch (``batch``: tokens per clip, from the experiment's ``stats/whisper_batches.csv``),
  per case (``total``: tokens/s from its ``stats/whisper_tokens.csv``) and per case status (``case``).
* every other suite — built by the experiment plugin that owns it (``Experiment.frame``), from the
  ``stats/`` tables that experiment wrote at finalize.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..stats import truthy

__all__ = ["Frame", "build_frame", "FRAME_BUILDERS", "suite_experiment", "c_to_f"]



def suite_experiment(suite: str) -> str | None:
    """The experiment whose data ``suite`` checks (None: ``network``, every experiment's data)."""
    from ..experiments import suite_owner

    owner = suite_owner(suite)
    return owner.name if owner is not None else None


def c_to_f(c: float | None) -> float | None:
    if c is None or (isinstance(c, float) and math.isnan(c)):
        return None
    return c * 9.0 / 5.0 + 32.0


@dataclass
class Frame:
    suite: str
    df: Any  # pandas.DataFrame
    problems: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


def _read_csv(path: Path):
    import pandas as pd

    return pd.read_csv(path, low_memory=False)


def _read_many(root: Path, kind: str, pattern: str, problems: list[str], required: list[str]):
    """Concatenate ``<root>/<kind>/<pattern>`` CSVs with a ``stem`` column; record missing files/columns."""
    import pandas as pd

    files = sorted((root / kind).glob(pattern))
    if not files:
        problems.append(f"missing file: {kind}/{pattern}")
        return None
    parts = []
    for f in files:
        try:
            d = _read_csv(f)
        except Exception as e:  # an empty or corrupt stream is a missing metric
            problems.append(f"unreadable file {kind}/{f.name}: {type(e).__name__}: {e}")
            continue
        d["stem"] = f.stem
        parts.append(d)
    if not parts:
        return None
    df = pd.concat(parts, ignore_index=True)
    for col in required:
        if col not in df.columns:
            problems.append(f"missing column {col!r} in {kind}/{pattern}")
    return df


def _parse_cards(v: Any) -> list[int]:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    if isinstance(v, (int, float)):
        return [int(v)]
    text = str(v).strip().strip("[]()")
    out = []
    for part in text.replace(";", ",").replace(" ", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(float(part)))
    return out


# --------------------------------------------------------------------------------------------- the plan
def planned_cases(profile: Any, experiment: str, problems: list[str] | None = None) -> list[dict]:
    """The cases the profile plans for ``experiment`` (empty when it is disabled): the checklist of
    evidence every suite walks. A plan that cannot be made is recorded in ``problems``."""
    from ..experiments import get_experiment

    if profile is None or not hasattr(profile, "experiments"):
        return []
    try:
        exp = get_experiment(experiment)
        if not exp.enabled(profile):
            return []
        return list(exp.plan(None, profile))
    except Exception as e:  # a profile that cannot be planned cannot be judged complete
        if problems is not None:
            problems.append(f"the plan of {experiment} cannot be made from the stored profile: {type(e).__name__}: {e}")
        return []


def _csv_rows(path: Path) -> int | None:
    """Data rows of a CSV file (None when the file is missing or unreadable)."""
    try:
        with open(path, newline="") as f:
            return max(0, sum(1 for line in f if line.strip()) - 1)
    except OSError:
        return None


# --------------------------------------------------------------------------------------------- thermal
THERMAL_COLUMNS = ["subject", "card", "role", "samples", "junction_readable", "memory_readable",
                   "junction_mean_c", "junction_p95_c", "junction_max_c", "memory_mean_c", "memory_max_c",
                   "junction_mean_f", "junction_p95_f", "junction_max_f", "memory_max_f", "idle_mean_c", "delta_active_idle_c",
                   "recovery_s", "throttle_events", "power_mean_w"]


# the columns of stats/bare_metal_thermal.csv the thermal suite judges (recovery_s is computed from
# idle_mean_c and stats/bare_metal_recovery.csv)
THERMAL_JUDGED = ["subject", "card", "role", "junction_readable", "memory_readable", "junction_mean_c", "junction_p95_c",
                  "junction_max_c", "memory_max_c", "idle_mean_c", "delta_active_idle_c", "throttle_events"]


def thermal_frame(run_dir: Path, profile: Any, params: dict) -> Frame:
    """The bare-metal experiment's thermal tables (written once at finalize; the report and the
    history read the same ones): one row per card × role from ``stats/bare_metal_thermal.csv``, and
    on active rows ``recovery_s`` = the first point of the card's curve in
    ``stats/bare_metal_recovery.csv`` within ``recovery_margin_c`` (a parameter) of its idle mean.
    Problems: a missing or unreadable table, a column the suite judges missing from either table
    (:data:`THERMAL_JUDGED`), the findings finalize recorded (unreadable streams,
    missing columns, a card of a planned group without samples in one of its phases), a planned
    group's telemetry or events file missing or empty, no active card."""
    import numpy as np
    import pandas as pd

    from ..experiments.bare_metal import RECOVERY_TABLE, THERMAL_TABLE, recovery_s
    from ..stats import read_problems, read_table

    problems: list[str] = []
    table = read_table(run_dir, THERMAL_TABLE, problems, "bare-metal")
    curve = read_table(run_dir, RECOVERY_TABLE, problems, "bare-metal")
    read_problems(run_dir, THERMAL_TABLE, problems, "bare-metal")
    _thermal_evidence(run_dir, profile, problems)
    margin = float(params.get("recovery_margin_c", 3.0))
    if not _table_columns(table, THERMAL_TABLE, ["card", "role"], problems):
        return Frame("thermal", pd.DataFrame({"subject": pd.Series([], dtype=str)}), problems,
                     {"recovery_margin_c": margin})
    # every column the suite judges (or recovery_s is computed from) is a problem when absent, and
    # stays absent from the frame so the expectations on it fail too
    _table_columns(table, THERMAL_TABLE, THERMAL_JUDGED, problems)
    df = table.copy()
    have_curve = _table_columns(curve, RECOVERY_TABLE, ["card", "seconds", "junction_c"], problems)
    if "idle_mean_c" in df.columns and have_curve:
        df["recovery_s"] = [recovery_s(curve, int(r["card"]), r.get("idle_mean_c", np.nan), margin)
                            if r["role"] == "active" else np.nan for r in df.to_dict("records")]
    df = df[[c for c in THERMAL_COLUMNS if c in df.columns]]
    if not (df["role"] == "active").any() if len(df) else True:
        problems.append("no card was active in the bare-metal telemetry")
    return Frame("thermal", df, problems, {"recovery_margin_c": margin})


def _thermal_evidence(run_dir: Path, profile: Any, problems: list[str]) -> None:
    """Every planned bare-metal group: its telemetry and events files, present and not empty."""
    for case in planned_cases(profile, "bare-metal", problems):
        stem, cid, cards = f"bare-metal-{case['case_id']}", case["case_id"], [int(c) for c in case["cards"]]
        what = f"bare-metal group {cid} (cards {cards})"
        for kind in ("telemetry", "events"):
            n = _csv_rows(run_dir / kind / f"{stem}.csv")
            if n is None:
                problems.append(f"missing {kind} of {what}: {kind}/{stem}.csv")
            elif n == 0:
                problems.append(f"empty {kind} of {what}: {kind}/{stem}.csv has no rows")


# --------------------------------------------------------------------------------------------- results
def _rows(run_dir: Path, experiment: str, problems: list[str], required: list[str]):
    p = run_dir / "results" / experiment / "rows.csv"
    if not p.is_file():
        problems.append(f"missing file: results/{experiment}/rows.csv")
        return None
    try:
        df = _read_csv(p)
    except Exception as e:
        problems.append(f"unreadable file results/{experiment}/rows.csv: {type(e).__name__}: {e}")
        return None
    for col in required:
        if col not in df.columns:
            problems.append(f"missing column {col!r} in results/{experiment}/rows.csv")
    if "status" in df.columns:
        df["status"] = df["status"].astype(str)
    # warm-up batches are not measurements
    if "warmup" in df.columns:
        df = df[~df["warmup"].map(truthy)]
    if "batch_index" in df.columns:
        df = df[pd_numeric(df["batch_index"]).fillna(0) >= 0]
    return df


def pd_numeric(s):
    import pandas as pd

    return pd.to_numeric(s, errors="coerce")


def _cases(run_dir: Path, experiment: str, problems: list[str], profile: Any = None) -> list[dict]:
    d = run_dir / "results" / experiment / "cases"
    out = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            st = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            problems.append(f"unreadable case status {p.name}: {e}")
            st = {"case_id": p.stem, "status": "unreadable"}
        out.append({"case_id": str(st.get("case_id", p.stem)), "status": str(st.get("status", "missing")),
                    "reason": st.get("reason") or st.get("error") or ""})
    seen = {c["case_id"] for c in out}
    try:
        meta = json.loads((run_dir / "run.json").read_text())
        failed = ((meta.get("experiments") or {}).get(experiment) or {}).get("failed_cases") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        failed = {}
    for cid, reason in failed.items():  # planned cases that never wrote a status file
        if str(cid) not in seen:
            out.append({"case_id": str(cid), "status": "not run", "reason": str(reason)})
            seen.add(str(cid))
    for case in planned_cases(profile, experiment, problems):  # the plan is the checklist
        cid = str(case["case_id"])
        if cid not in seen:
            why = f"no case status file results/{experiment}/cases/{cid}.json for planned case {cid}"
            out.append({"case_id": cid, "status": "missing", "reason": why})
            problems.append(f"missing case status of {experiment} case {cid}: results/{experiment}/cases/{cid}.json")
    if not out:
        problems.append(f"no case status files in results/{experiment}/cases/")
    return out


def _case_rows(cases: list[dict], extra: dict | None = None) -> list[dict]:
    rows = []
    for c in cases:
        r = {"subject": f"case {c['case_id']}", "kind": "case", "case_id": c["case_id"], "case_status": c["status"],
             "reason": c["reason"]}
        r.update(extra or {})
        rows.append(r)
    return rows


# the columns of stats/sd_latency.csv the latency suite judges
LATENCY_JUDGED = ["subject", "process_count", "batch_config", "n_rows", "failed_rows", "median_per_image_s", "cv_per_image",
                  "per_card_scaling"]


def latency_frame(run_dir: Path, profile: Any, params: dict) -> Frame:
    """The sd-throughput experiment's ``stats/sd_latency.csv`` (written once at finalize; the report
    shows the same table) as ``config`` rows + the bound of each batch config from ``params``, and
    one ``case`` row per case status. A missing or unreadable table, a column the suite judges
    missing from it (:data:`LATENCY_JUDGED`), the findings finalize recorded,
    a planned process count × batch config without its row and a missing
    ``results/sd-throughput/rows.csv`` (the evidence) are problems (fail closed)."""
    import numpy as np
    import pandas as pd

    from ..experiments.sd_throughput import LATENCY_TABLE
    from ..stats import read_problems, read_table

    problems: list[str] = []
    table = read_table(run_dir, LATENCY_TABLE, problems, "sd-throughput")
    read_problems(run_dir, LATENCY_TABLE, problems, "sd-throughput")
    if _csv_rows(run_dir / "results" / "sd-throughput" / "rows.csv") is None:  # the evidence the table was computed from
        problems.append("missing file: results/sd-throughput/rows.csv")
    cases = _cases(run_dir, "sd-throughput", problems, profile)
    spec = getattr(getattr(profile, "experiments", None), "sd_throughput", None)
    planned = [(int(n), str(bc)) for n in (spec.process_counts if spec else []) for bc in (spec.batch_configs if spec else [])]
    limits = params.get("per_image_max_s_by_batch_config") or {}
    default_limit = params.get("per_image_max_s")
    # every column the suite judges: a missing one is a problem naming table and column, and stays
    # missing from the frame (its expectations fail instead of passing over NaN)
    _table_columns(table, LATENCY_TABLE, LATENCY_JUDGED, problems)
    have_metric = table is not None and {"process_count", "batch_config"}.issubset(table.columns)
    rows: list[dict] = []
    if have_metric:
        table["batch_config"] = table["batch_config"].astype(str)
        have = {(int(n), str(b)) for n, b in table[["process_count", "batch_config"]].dropna().itertuples(index=False)}
        for n, bc in planned:
            if (n, bc) not in have:
                problems.append(f"missing row of planned process count {n} × batch config {bc} in {LATENCY_TABLE}")
        for r in table.to_dict("records"):
            bc = r["batch_config"]
            limit = limits.get(bc, default_limit)
            rows.append({**r, "kind": "config", "per_image_limit_s": float(limit) if limit is not None else np.nan})
    rows += _case_rows(cases)
    out = pd.DataFrame(rows)
    if "subject" not in out.columns:
        out["subject"] = pd.Series([], dtype=str)
    if "kind" not in out.columns:
        out["kind"] = pd.Series([], dtype=str)
    if have_metric:  # a table without config rows: its columns exist (the expectations select no row)
        for col in [c for c in LATENCY_JUDGED if c in table.columns] + ["per_image_limit_s"]:
            if col not in out.columns:
                out[col] = np.nan
    if "case_status" not in out.columns:
        out["case_status"] = pd.Series([None] * len(out), dtype=object)
    return Frame("latency", out, problems)


def whisper_frame(run_dir: Path, profile: Any, params: dict) -> Frame:
    """The whisper experiment's tables (written once at finalize; the report shows the same ones):
    one ``batch`` row per measured batch from ``stats/whisper_batches.csv`` (tokens per clip and
    the configured ``new_tokens``), one ``total`` row per case from ``stats/whisper_tokens.csv``
    (tokens/s over the case's wall time) and one ``case`` row per case status. Problems: a missing
    or unreadable table or column, the findings finalize recorded, a planned case without its rows
    in either table, a missing ``results/whisper/rows.csv`` (the evidence) — fail closed."""
    import numpy as np
    import pandas as pd

    from ..experiments.whisper_tokens import BATCH_TABLE, STATS
    from ..stats import read_problems, read_table

    problems: list[str] = []
    batches = read_table(run_dir, BATCH_TABLE, problems, "whisper")
    read_problems(run_dir, BATCH_TABLE, problems, "whisper")
    totals = read_table(run_dir, STATS, problems, "whisper")
    if _csv_rows(run_dir / "results" / "whisper" / "rows.csv") is None:  # the evidence the tables were computed from
        problems.append("missing file: results/whisper/rows.csv")
    cases = _cases(run_dir, "whisper", problems, profile)
    planned = [str(c["case_id"]) for c in planned_cases(profile, "whisper")]
    rows: list[dict] = []
    have_batches = _table_columns(batches, BATCH_TABLE, ["subject", "case_id", "tokens_per_clip", "configured_tokens"], problems)
    if have_batches:
        batches = batches.astype({"case_id": str})
        _planned_rows(batches, planned, BATCH_TABLE, problems)
        for r in batches.to_dict("records"):
            rows.append({"subject": r["subject"], "kind": "batch", "case_id": r["case_id"],
                         "tokens_per_clip": r["tokens_per_clip"], "configured_tokens": r["configured_tokens"]})
    have_totals = _table_columns(totals, STATS, ["case_id", "tokens", "wall_s", "total_tokens_per_s"], problems)
    if have_totals:
        totals = totals.astype({"case_id": str})
        _planned_rows(totals, planned, STATS, problems)
        for r in totals.to_dict("records"):
            rows.append({"subject": f"case {r['case_id']} total", "kind": "total", "case_id": r["case_id"],
                         "tokens_total": float(r["tokens"]), "wall_s": r["wall_s"], "tokens_per_s": r["total_tokens_per_s"]})
    rows += _case_rows(cases)
    out = pd.DataFrame(rows)
    for col in ("subject", "kind", "case_status"):
        if col not in out.columns:
            out[col] = pd.Series([None] * len(out), dtype=object)
    for col, present in (("tokens_per_clip", have_batches), ("configured_tokens", have_batches), ("tokens_per_s", have_totals)):
        if present and col not in out.columns:  # a column of a missing table stays missing (its expectations fail)
            out[col] = np.nan
    return Frame("whisper", out, problems)


def _table_columns(table: Any, name: str, needed: list[str], problems: list[str]) -> bool:
    """Whether ``table`` was read and has ``needed``; each missing column is a problem naming it."""
    if table is None:
        return False
    lacking = [c for c in needed if c not in table.columns]
    for c in lacking:
        problems.append(f"missing column {c!r} in {name} (`mi300x-cert finalize RUN_DIR` computes the table again)")
    return not lacking


def _planned_rows(table: Any, planned: list[str], name: str, problems: list[str]) -> None:
    """Every planned case has a row in ``table``."""
    have = set(table["case_id"].dropna())
    for cid in planned:
        if cid not in have:
            problems.append(f"missing row of planned case {cid} in {name}")


# --------------------------------------------------------------------------------------------- network
def network_mode(run_dir: Path) -> str | None:
    """The isolation mode the run recorded (enforced | observed): ``conditions.json`` top level and
    per experiment; several different modes give ``mixed: a, b`` (not a valid mode)."""
    try:
        conds = json.loads((run_dir / "conditions.json").read_text())
    except (OSError, json.JSONDecodeError):
        conds = None
    if isinstance(conds, dict):
        modes: set[str] = set()
        for entry in [conds] + [e for e in (conds.get("experiments") or {}).values() if isinstance(e, dict)]:
            v = entry.get("network_mode")
            if isinstance(v, str):
                modes.add(v)
            elif isinstance(v, list):
                modes |= {str(x) for x in v}
        if len(modes) == 1:
            return modes.pop()
        if modes:
            return "mixed: " + ", ".join(sorted(modes))
    for rel in ("run.json", "conditions.json", "network/summary.json"):
        p = run_dir / rel
        if not p.is_file():
            continue
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        found = _find_mode(data)
        if found:
            return found
    return None


def _find_mode(obj: Any, depth: int = 0) -> str | None:
    if depth > 4:
        return None
    if isinstance(obj, dict):
        for k in ("network_mode", "isolation_mode", "effective_mode", "isolation"):
            v = obj.get(k)
            if isinstance(v, str):
                return v
        net = obj.get("network")
        if isinstance(net, dict):
            for k in ("mode", "effective_mode", "isolation", "isolation_mode"):
                if isinstance(net.get(k), str) and net.get(k) != "auto":
                    return net[k]
        for v in obj.values():
            if isinstance(v, (dict, list)):
                f = _find_mode(v, depth + 1)
                if f:
                    return f
    elif isinstance(obj, list):
        for v in obj:
            f = _find_mode(v, depth + 1)
            if f:
                return f
    return None


_ENFORCED_EVIDENCE = ("enforced: every worker ran in a private network namespace, made for its case or its experiment (its /proc/<pid>/ns/net differs from "
                      "the host's; recorded per worker in netns/*.csv) whose interfaces moved no non-loopback byte, "
                      "and the socket audit of the workers (read from their own namespaces) found no external "
                      "connection; host-wide interface traffic is recorded and reported as background, not judged")
_OBSERVED_EVIDENCE = ("observed: the socket audit of the workload processes (any connection to a non-loopback "
                      "address fails, naming the process and the address) and the host's interface traffic during "
                      "active phases judged against the same host's idle-phase rate (excess bytes ≤ the bound)")


def _worker_rows(netns, mode: str | None, planned: dict[str, dict], problems: list[str]) -> list[dict]:
    """One row per worker process (stem × pid) from the ``netns`` stream. In enforced mode each
    planned case must show a namespace reading taken after its workers started (phase other than
    ``load``) for as many workers as it has cards, all in a namespace other than the host's."""
    import pandas as pd

    enforced = mode == "enforced"
    rows: list[dict] = []
    have = netns is not None and {"pid", "netns", "host_netns", "phase"}.issubset(netns.columns)
    by_stem: dict[str, int] = {}
    if have:
        netns = netns.copy()
        netns["phase"] = netns["phase"].fillna("").astype(str)
        for c in ("external_bytes_sent", "external_bytes_recv"):
            netns[c] = pd_numeric(netns[c]).fillna(0) if c in netns.columns else 0
        for (stem, pid), g in netns.groupby(["stem", "pid"]):
            started = g[~g["phase"].isin(["load", "", "idle"])]
            spaces = sorted({str(x) for x in started["netns"].dropna()})
            host = sorted({str(x) for x in started["host_netns"].dropna()})
            isolated = bool(len(started)) and bool(spaces) and not (set(spaces) & set(host))
            ext = float((started["external_bytes_sent"] + started["external_bytes_recv"]).max()) if len(started) else float("nan")
            ifaces = " ".join(sorted({x for v in started.get("external_interfaces", pd.Series(dtype=str)).dropna().astype(str) for x in v.split()}))
            rows.append({"subject": f"{stem} worker pid {int(pid)}", "kind": "worker" if enforced else "worker_observed",
                         "experiment": stem, "pid": int(pid), "netns": ", ".join(spaces), "host_netns": ", ".join(host),
                         "isolated": isolated, "ns_external_bytes": ext, "ns_external_interfaces": ifaces,
                         "readings": int(len(started))})
            if len(started):
                by_stem[stem] = by_stem.get(stem, 0) + 1
    if enforced:
        for stem, case in planned.items():
            need = len(case.get("cards") or [])
            got = by_stem.get(stem, 0)
            if got < need:
                problems.append(f"missing namespace evidence of {case['_experiment']} case {case['case_id']}: "
                                f"netns/{stem}.csv has readings of {got} of its {need} worker(s) after they started")
    return rows


def _host_traffic(net, mode: str | None, excluded: set[str]) -> tuple[list[dict], dict]:
    """Host-wide interface traffic: one row per stream × interface × phase. Each row's reading
    covers the time since the previous reading of that interface (``seconds``). The idle rate of an
    interface = its bytes over the ``idle`` phases of the whole run ÷ their seconds (when no idle
    phase was recorded: over every phase but ``active``). Active rows get ``expected_bytes_*`` =
    idle rate × seconds and ``excess_bytes_*`` = bytes − expected (≥ 0). Enforced mode reports them
    as ``background`` (other processes' bytes; the workers are proven isolated), observed mode as
    ``traffic_active`` (judged: excess ≤ the bound)."""
    import numpy as np

    net = net.copy()
    net["interface"] = net["interface"].astype(str)
    net = net[~net["interface"].isin(excluded) & ~net["interface"].str.startswith("lo")].copy()
    net["phase"] = net["phase"].fillna("").astype(str)
    for c in ("d_sent", "d_recv"):
        net[c] = pd_numeric(net[c]).fillna(0)
    if "t" in net.columns:
        net["t"] = pd_numeric(net["t"])
        net = net.sort_values(["stem", "interface", "t"])
        net["dt"] = net.groupby(["stem", "interface"])["t"].diff().fillna(0).clip(lower=0)
    else:
        net["dt"] = np.nan
    rates: dict[str, tuple[float, float, str]] = {}
    for itf, g in net.groupby("interface"):
        base = g[g["phase"] == "idle"]
        basis = "idle phases"
        if float(base["dt"].sum()) <= 0:
            base, basis = g[g["phase"] != "active"], "phases other than active (no idle phase recorded)"
        secs = float(base["dt"].sum())
        if secs > 0:
            rates[itf] = (float(base["d_sent"].sum()) / secs, float(base["d_recv"].sum()) / secs, basis)
    rows: list[dict] = []
    background = {"bytes_sent": 0.0, "bytes_recv": 0.0}
    for (stem, itf, phase), g in net.groupby(["stem", "interface", "phase"]):
        sent, recv, secs = float(g["d_sent"].sum()), float(g["d_recv"].sum()), float(g["dt"].sum())
        row = {"subject": f"{stem} {itf} {phase}", "experiment": stem, "interface": itf, "phase": phase,
               "bytes_sent": sent, "bytes_recv": recv, "samples": len(g), "seconds": secs}
        if phase == "active":
            rs, rr, basis = rates.get(itf, (float("nan"), float("nan"), "no idle reading"))
            exp_s, exp_r = rs * secs, rr * secs
            row.update(idle_rate_sent_bps=rs, idle_rate_recv_bps=rr, rate_basis=basis,
                       expected_bytes_sent=exp_s, expected_bytes_recv=exp_r,
                       # no idle baseline: every byte counts as excess (fails closed in observed mode)
                       excess_bytes_sent=max(0.0, sent - (exp_s if exp_s == exp_s else 0.0)),
                       excess_bytes_recv=max(0.0, recv - (exp_r if exp_r == exp_r else 0.0)))
            row["kind"] = "background" if mode == "enforced" else "traffic_active"
            background["bytes_sent"] += sent
            background["bytes_recv"] += recv
        else:
            row["kind"] = "traffic_other"
        rows.append(row)
    return rows, {"active_bytes": background, "idle_rates_bps": {k: {"sent": v[0], "recv": v[1], "basis": v[2]}
                                                                 for k, v in rates.items()}}


def network_frame(run_dir: Path, profile: Any, params: dict) -> Frame:
    """Network isolation evidence; which stream decides depends on the recorded mode (see
    :data:`_ENFORCED_EVIDENCE`, :data:`_OBSERVED_EVIDENCE` and docs/verdicts.md). The plan is the
    checklist: every planned case of every enabled experiment needs its ``network/`` and
    ``sockets/`` stream (and in enforced mode its ``netns/`` readings), else the suite fails
    naming the missing file."""
    import pandas as pd

    problems: list[str] = []
    mode = network_mode(run_dir)
    planned: dict[str, dict] = {}
    from ..experiments import experiment_names

    for exp in experiment_names():
        for case in planned_cases(profile, exp, problems):
            planned[f"{exp}-{case['case_id']}"] = {**case, "_experiment": exp}
    for stem, case in planned.items():
        kinds = ("network", "sockets", "netns") if mode == "enforced" else ("network", "sockets")
        for kind in kinds:
            n = _csv_rows(run_dir / kind / f"{stem}.csv")
            if n is None:
                problems.append(f"missing {kind} evidence of {case['_experiment']} case {case['case_id']}: {kind}/{stem}.csv")
            elif n == 0 and kind != "sockets":  # no socket is a valid audit result; no reading is not
                problems.append(f"empty {kind} evidence of {case['_experiment']} case {case['case_id']}: {kind}/{stem}.csv has no readings")
    net = _read_many(run_dir, "network", "*.csv", problems, ["phase", "interface", "d_sent", "d_recv"])
    socks = _read_many(run_dir, "sockets", "*.csv", problems, ["pid", "raddr", "external"])
    netns = None
    if (run_dir / "netns").is_dir() or mode == "enforced":
        netns = _read_many(run_dir, "netns", "*.csv", problems if mode == "enforced" else [],
                           ["pid", "netns", "host_netns", "phase"])
    excluded = set(getattr(getattr(profile, "network", None), "exclude_interfaces", None) or []) | {"lo"}
    rows: list[dict] = []
    have_traffic = net is not None and {"phase", "interface", "d_sent", "d_recv"}.issubset(net.columns)
    host: dict[str, Any] = {}
    if have_traffic:
        traffic, host = _host_traffic(net, mode, excluded)
        rows += traffic
    n_external = 0
    have_socks = socks is not None and {"pid", "raddr", "external"}.issubset(socks.columns)
    if have_socks:
        for i, r in enumerate(socks.to_dict("records")):
            external = truthy(r.get("external"))
            n_external += int(external)
            proc = r.get("process")
            who = f"{proc} (pid {r.get('pid')})" if isinstance(proc, str) and proc else f"pid {r.get('pid')}"
            rows.append({"subject": f"{who} → {r.get('raddr')} ({r.get('stem')}, {r.get('phase', '')}) #{i}",
                         "kind": "socket", "experiment": r.get("stem"), "phase": str(r.get("phase", "")),
                         "pid": r.get("pid"), "process": proc if isinstance(proc, str) else None,
                         "raddr": str(r.get("raddr")), "external": external})
    workers = _worker_rows(netns, mode, planned, problems)
    rows += workers
    decided_by = _ENFORCED_EVIDENCE if mode == "enforced" else _OBSERVED_EVIDENCE if mode == "observed" else None
    summary: dict[str, Any] = {"subject": "run summary", "kind": "summary", "mode": mode, "decided_by": decided_by,
                               "workers": sum(1 for w in workers),
                               "workers_isolated": sum(1 for w in workers if w["isolated"])}
    if have_traffic:
        act = host.get("active_bytes") or {}
        summary["external_bytes_active"] = float(act.get("bytes_sent", 0) + act.get("bytes_recv", 0))
        summary["background_bytes_active"] = summary["external_bytes_active"] if mode == "enforced" else 0.0
    if have_socks:
        summary["external_connections"] = n_external
    rows.append(summary)
    out = pd.DataFrame(rows)
    if have_traffic:
        for col in ("bytes_sent", "bytes_recv", "excess_bytes_sent", "excess_bytes_recv"):
            if col not in out.columns:
                out[col] = float("nan")
    if have_socks and "external" not in out.columns:
        out["external"] = None
    if "isolated" not in out.columns:
        out["isolated"] = pd.Series([None] * len(out), dtype=object)
    if "ns_external_bytes" not in out.columns:
        out["ns_external_bytes"] = float("nan")
    evidence = {"mode": mode, "decided_by": decided_by,
                "workers": len(workers), "workers_isolated": sum(1 for w in workers if w["isolated"]),
                "namespaces": sorted({w["netns"] for w in workers if w["netns"]}),
                "host_netns": sorted({w["host_netns"] for w in workers if w["host_netns"]}),
                "background_bytes": (host.get("active_bytes") if mode == "enforced" else None),
                "host_active_bytes": host.get("active_bytes"),
                "host_idle_rates_bps": host.get("idle_rates_bps")}
    return Frame("network", out, problems, {"excluded_interfaces": sorted(excluded), "mode": mode, "evidence": evidence})


# the frames of the experiments whose verdict rules live here (their plugins call these)
FRAME_BUILDERS: dict[str, Callable[[Path, Any, dict], Frame]] = {
    "latency": latency_frame,
    "thermal": thermal_frame,
    "network": network_frame,
    "whisper": whisper_frame,
}


def build_frame(suite: str, run_dir: Path | str, profile: Any, params: dict | None = None) -> Frame:
    """The metric frame of ``suite``: ``network`` here, every other suite from the plugin that owns it."""
    from ..experiments import suite_owner

    if suite == "network":
        return network_frame(Path(run_dir), profile, params or {})
    owner = suite_owner(suite)
    if owner is None:
        raise KeyError(suite)
    return owner.frame(suite, Path(run_dir), profile, params or {})
