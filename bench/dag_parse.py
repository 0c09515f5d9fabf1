"""DAG parse time of the recertification DAG files for generated fleets of N hosts.

    python bench/dag_parse.py [--hosts 10,200,1000,2000] [--repeats 1] [--processes 2]
                              [--out bench/results/dag-parse.json]

For every N a fleet file of N hosts is generated (profiles, card groups, schedules and alert
recipients varied the way a real fleet is) and pointed at with ``$MI300X_CERT_FLEET``. Every
recertification DAG file (``dags/recertify.py`` and its shards ``dags/recertify_<k>.py``) is then
parsed the way Airflow's dag-processor does it: a fresh process per file and measurement, Airflow
imported first (the dag-processor's parsing process has it imported already), then
``DagBag(dag_folder=<file>)`` — the module import that ``[core] dagbag_import_timeout`` limits —
and ``DagSerialization.to_dict`` of every DAG, which the dag-processor does next in the same
process. Recorded per file: seconds of both, DAG and task counts, import errors and the peak RSS
of the process. Per fleet: the slowest file (what must stay under the timeout), the sum over files
(CPU seconds) and the wall time of all files parsed by ``--processes`` parallel processes (the
dag-processor's ``[dag_processor] parsing_processes``, default 2).

Conditions (cores, load average, CPU, Python and library versions, git commit) go with the results.
``python bench/dag_parse.py --write-fleet 50 fleet.yaml`` only writes a generated fleet file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HOSTS = [10, 200, 1000, 2000]

# (profile, sku, cards, card groups) of the generated hosts, in turn; each agrees with its profile's
# host.cards (the fleet file is checked against the profiles at load)
_KINDS = [
    ("mi300x", "mi300x", 16, {"[12-15]": [12, 13, 14, 15], "[0-3]": [0, 1, 2, 3], "[4-7]": [4, 5, 6, 7],
                              "[8-11]": [8, 9, 10, 11], "[0,2,5,6,7,9,11,12]": [0, 2, 5, 6, 7, 9, 11, 12]}),
    ("h200", "h200", 1, {"[0]": [0]}),
    ("h100", "h100", 1, {"[0]": [0]}),
    ("smoke", "smoke", 16, {"[12-15]": [12, 13, 14, 15], "[0-3]": [0, 1, 2, 3]}),
]


def fleet_servers(n: int) -> list[dict[str, Any]]:
    """``n`` fleet entries: host names ``node-00000``…, kinds and schedules in turn (a weekly slot per host)."""
    out = []
    for i in range(n):
        profile, sku, cards, groups = _KINDS[i % len(_KINDS)]
        entry: dict[str, Any] = {
            "name": f"{profile}-{i:05d}", "profile": profile, "sku": sku, "cards": cards,
            "card_groups": groups, "schedule": f"{i % 60} {(i // 60) % 24} * * {(i // 1440) % 7}",
            "alerts": {"email": [f"rack-{i // 40:03d}@example.com", "gpu-fleet@example.com"]},
            "tags": [f"rack:{i // 40:03d}"],
        }
        if i % 3 == 0:
            entry["alerts"]["slack_conn_id"] = "slack_gpu_fleet"
        if i % 50 == 49:
            entry["schedule"] = None  # manual only
        out.append(entry)
    return out


def write_fleet(n: int, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"servers": fleet_servers(n)}, sort_keys=False))
    return path


def recertify_files() -> list[Path]:
    """``dags/recertify.py`` and its shard files, in shard order."""
    files = [REPO / "dags" / "recertify.py"]
    shards = sorted(REPO.glob("dags/recertify_*.py"), key=lambda p: int(p.stem.rsplit("_", 1)[1])
                    if p.stem.rsplit("_", 1)[1].isdigit() else 10**9)
    return files + shards


# ---- the children: one parse of one file, or all files the way the dag-processor forks them --------
def _parse_one(file: str) -> dict[str, Any]:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    t1, c1 = time.perf_counter(), time.process_time()
    try:  # include_examples is gone from DagBag in some 3.x releases; the explicit folder is what matters
        bag = DagBag(dag_folder=file, include_examples=False)
    except TypeError:
        bag = DagBag(dag_folder=file)
    t2, c2 = time.perf_counter(), time.process_time()
    serialized = [DagSerialization.to_dict(d) for d in bag.dags.values()]
    t3, c3 = time.perf_counter(), time.process_time()
    return {
        "file": Path(file).name,
        "parse_s": round(t2 - t1, 3),
        "parse_cpu_s": round(c2 - c1, 3),
        "serialize_s": round(t3 - t2, 3),
        "serialize_cpu_s": round(c3 - c2, 3),
        "dags": len(bag.dags),
        "tasks": sum(len(d.tasks) for d in bag.dags.values()),
        "serialized_bytes": sum(len(json.dumps(s, default=str)) for s in serialized),
        "import_errors": {Path(k).name: str(v).replace(str(REPO), "<repo>")[-500:]
                          for k, v in bag.import_errors.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _child(file: str) -> None:
    t0 = time.perf_counter()
    import airflow.dag_processing.dagbag  # noqa: F401
    import airflow.serialization.serialized_objects  # noqa: F401

    row = {"airflow_import_s": round(time.perf_counter() - t0, 3), **_parse_one(file)}
    print(json.dumps(row))


def _fleet_child(files: list[str], processes: int) -> None:
    """Airflow imported once, then one forked process per file, ``processes`` at a time — what the
    dag-processor does (it forks its parsing processes from a manager that has Airflow imported)."""
    import multiprocessing

    import airflow.dag_processing.dagbag  # noqa: F401
    import airflow.serialization.serialized_objects  # noqa: F401

    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(processes, maxtasksperchild=1) as pool:
        rows = pool.map(_parse_one, files, chunksize=1)
    print(json.dumps({"wall_s": round(time.perf_counter() - t0, 3), "rows": rows}))


def _run_child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         env=env, cwd=env["AIRFLOW_HOME"], timeout=900)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {out.returncode}): {out.stderr[-2000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["process_wall_s"] = round(wall, 3)
    return row


# ---- conditions ----------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def conditions(processes: int) -> dict[str, Any]:
    import yaml

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "mi300x_cert", "dags"], capture_output=True,
                           text=True, cwd=REPO)
    try:
        from airflow.configuration import conf

        timeout = conf.getfloat("core", "dagbag_import_timeout")
        processor_timeout = conf.getfloat("dag_processor", "dag_file_processor_timeout", fallback=None)
    except Exception:  # noqa: BLE001 - conditions are best effort
        timeout = processor_timeout = None
    return {
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": _cpu_model(),
        "loadavg_before": list(os.getloadavg()),
        "python": platform.python_version(),
        "apache-airflow": _version("apache-airflow"),
        "apache-airflow-task-sdk": _version("apache-airflow-task-sdk"),
        "pydantic": _version("pydantic"),
        "pyyaml": _version("PyYAML"),
        "libyaml": bool(getattr(yaml, "__with_libyaml__", False)),
        "jsonschema": _version("jsonschema"),
        "git": (git.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) or None,
        "dagbag_import_timeout_s": timeout,
        "dag_file_processor_timeout_s": processor_timeout,
        "parallel_processes": processes,
        "method": "per file: a fresh process imports Airflow, then DagBag(dag_folder=<file>) (parse) and "
                  "DagSerialization.to_dict of every DAG (serialize); fleet: one process imports Airflow and "
                  "forks one process per file, parallel_processes at a time",
    }


def measure(n: int, processes: int, workdir: Path) -> dict[str, Any]:
    fleet = write_fleet(n, workdir / f"fleet-{n}.yaml")
    home = workdir / "airflow-home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "MI300X_CERT_FLEET": str(fleet), "AIRFLOW_HOME": str(home),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PYTHONPATH": os.pathsep.join(
               [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    files = recertify_files()
    # one file at a time, each in a fresh process: per-file seconds without contention from each other
    rows = [_run_child(["--child", str(f)], env) for f in files]
    # all files, forked from one process that has Airflow imported, `processes` at a time
    fleet = _run_child(["--fleet-child", str(processes), *map(str, files)], env)
    errors = {k: v for r in rows for k, v in r["import_errors"].items()}
    return {
        "hosts": n,
        "files": len(files),
        "dags": sum(r["dags"] for r in rows),
        "tasks": sum(r["tasks"] for r in rows),
        "airflow_import_s": max(r["airflow_import_s"] for r in rows),
        "max_file_parse_s": max(r["parse_s"] for r in rows),
        "max_file_parse_serialize_s": round(max(r["parse_s"] + r["serialize_s"] for r in rows), 3),
        "sum_parse_s": round(sum(r["parse_s"] for r in rows), 3),
        "sum_parse_cpu_s": round(sum(r["parse_cpu_s"] for r in rows), 3),
        "sum_serialize_s": round(sum(r["serialize_s"] for r in rows), 3),
        "sum_serialize_cpu_s": round(sum(r["serialize_cpu_s"] for r in rows), 3),
        "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
        "fleet_wall_s": fleet["wall_s"],
        "fleet_wall_note": f"parse + serialize of all {len(files)} file(s), each in a process forked from one "
                           f"that has Airflow imported, {processes} at a time",
        "fleet_max_file_parse_s": max(r["parse_s"] for r in fleet["rows"]),
        "fleet_import_errors": {k: v for r in fleet["rows"] for k, v in r["import_errors"].items()},
        "import_errors": errors,
        "per_file": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", default=",".join(map(str, DEFAULT_HOSTS)), help="fleet sizes, comma-separated")
    ap.add_argument("--repeats", type=int, default=1, help="measurements per fleet size")
    ap.add_argument("--processes", type=int, default=2, help="parallel parsers for the fleet wall time")
    ap.add_argument("--out", default=None, help="results JSON (default: print only)")
    ap.add_argument("--label", default=None, help="a name for this run in the results file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--fleet-child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--write-fleet", nargs=2, metavar=("N", "FILE"), help="only write a generated fleet of N hosts")
    a = ap.parse_args(argv)
    if a.child:
        _child(a.child)
        return 0
    if a.fleet_child:
        _fleet_child(a.fleet_child[1:], int(a.fleet_child[0]))
        return 0
    if a.write_fleet:
        n, path = a.write_fleet
        if not n.isdigit() or int(n) < 1:
            ap.error(f"--write-fleet: N must be a positive integer, got {n!r}")
        write_fleet(int(n), Path(path))
        return 0
    try:
        sizes = [int(x) for x in a.hosts.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--hosts: {a.hosts!r} is not a comma-separated list of integers")
    if not sizes or min(sizes) < 1:
        ap.error(f"--hosts: {a.hosts!r}: every fleet size must be ≥ 1")
    if a.repeats < 1 or a.processes < 1:
        ap.error("--repeats and --processes must be ≥ 1")

    run: dict[str, Any] = {"label": a.label, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "conditions": conditions(a.processes), "results": []}
    with tempfile.TemporaryDirectory(prefix="dag-parse-") as tmp:
        for n in sizes:
            for rep in range(a.repeats):
                r = measure(n, a.processes, Path(tmp))
                r["repeat"] = rep
                run["results"].append(r)
                print(f"{n:>6} hosts: {r['dags']} DAGs, {r['tasks']} tasks in {r['files']} file(s); slowest file "
                      f"{r['max_file_parse_s']:.2f} s parse ({r['max_file_parse_serialize_s']:.2f} s with "
                      f"serialization); all files {r['sum_parse_s']:.2f} s parse, {r['sum_serialize_s']:.2f} s "
                      f"serialize; fleet wall {r['fleet_wall_s']:.2f} s with {a.processes} processes; "
                      f"peak RSS {r['max_peak_rss_mb']:.0f} MB"
                      + (f", IMPORT ERRORS {sorted(r['import_errors'])}" if r["import_errors"] else ""), flush=True)
    run["conditions"]["loadavg_after"] = list(os.getloadavg())
    if a.out:
        out = Path(a.out)
        runs: list = []
        if out.is_file():
            old = json.loads(out.read_text())
            runs = old.get("runs", []) if isinstance(old, dict) else []
        runs.append(run)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(out.suffix + ".tmp")
        tmp_out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
        tmp_out.replace(out)
        print(f"results: {out}")
    return 1 if any(r["import_errors"] for r in run["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
