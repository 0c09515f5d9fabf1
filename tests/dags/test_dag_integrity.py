"""Every DAG file parses, carries its metadata, and parsing is cheap and offline."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
HEAVY = ("torch", "great_expectations", "boto3", "diffusers", "transformers", "matplotlib")


def _dagbag():
    from airflow.dag_processing.dagbag import DagBag

    try:  # the explicit folder is what matters; include_examples is gone in some 3.x releases
        return DagBag(dag_folder=str(DAGS), include_examples=False)
    except TypeError:
        return DagBag(dag_folder=str(DAGS))


@pytest.fixture(scope="module")
def dagbag():
    return _dagbag()


def test_every_dag_file_imports(dagbag):
    assert dagbag.import_errors == {}, dagbag.import_errors
    from mi300x_cert.fleet import load_fleet

    expected = {f"recertify_{s.name}" for s in load_fleet().servers}
    expected |= {f"manual_{k}" for k in ("certify", "bare_metal", "sd_throughput", "whisper", "resnet50", "hardware_ceilings")}
    assert expected <= set(dagbag.dag_ids), sorted(dagbag.dag_ids)
    from mi300x_cert.airflow_dags import recertify_shard, recertify_shard_file

    for s in load_fleet().servers:  # each host's DAG comes from the file of its shard
        assert Path(dagbag.dags[f"recertify_{s.name}"].fileloc).name == recertify_shard_file(recertify_shard(s.name))
    for f in DAGS.glob("*.py"):
        # a recertification shard file holds no DAG when no host of the fleet hashes to it
        if not f.name.startswith("_") and not f.name.startswith("recertify"):
            assert any(d.fileloc == str(f) for d in dagbag.dags.values()), f"{f.name} defines no DAG"


def test_dags_have_tags_retries_and_docs(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert "mi300x-cert" in dag.tags
        assert dag.default_args.get("retries", 0) >= 1, f"{dag_id} has no retries"
        assert dag.doc_md and len(dag.doc_md) > 80, f"{dag_id} has no doc_md"
        assert dag.description and len(dag.description) > 20, f"{dag_id} has no description"


def test_recertify_dags_follow_the_fleet(dagbag):
    from mi300x_cert.fleet import load_fleet

    for server in load_fleet().servers:
        dag = dagbag.dags[f"recertify_{server.name}"]
        assert dag.catchup is False and dag.max_active_runs == 1
        assert getattr(dag.timetable, "expression", None) == server.schedule
        ids = [t.task_id for t in dag.tasks]
        for tid in ("preflight", "bare_metal", "plan_sd", "run_sd_case", "finalize_sd", "whisper", "resnet50",
                    "hardware_ceilings", "finish_run", "report", "sign", "publish", "register"):
            assert tid in ids
        for suite in ("latency", "thermal", "network", "whisper", "resnet50", "hardware-ceilings"):
            assert f"validation.validate_{suite}" in ids
        for tid in ("preflight", "bare_metal", "run_sd_case", "whisper", "resnet50", "hardware_ceilings"):
            t = dag.get_task(tid)
            assert t.queue == f"gpu-{server.name}" and t.pool == f"gpu-{server.name}"
            assert t.pool_slots == server.cards
        for tid in ("report", "sign", "publish", "register", "finish_run"):
            assert dag.get_task(tid).trigger_rule == "all_done", tid
        # chain order
        assert "bare_metal" in dag.get_task("plan_sd").upstream_task_ids
        assert "finalize_sd" in dag.get_task("whisper").upstream_task_ids
        assert "resnet50" in dag.get_task("hardware_ceilings").upstream_task_ids  # registry order
        assert "hardware_ceilings" in dag.get_task("finish_run").upstream_task_ids
        assert {f"validation.validate_{s}" for s in ("latency", "thermal")} <= dag.get_task("report").upstream_task_ids
        assert "publish" in dag.get_task("register").upstream_task_ids
        # the conclusion runs on the control plane: no GPU queue, pool or executor of the host
        reg = dag.get_task("register")
        assert reg.queue != f"gpu-{server.name}" and reg.pool != f"gpu-{server.name}"
        assert getattr(reg, "executor", None) in (None, "")
        assert dag.get_task("run_sd_case").is_mapped if hasattr(dag.get_task("run_sd_case"), "is_mapped") else True


def test_gpu_executor_comes_from_the_environment(monkeypatch):
    from mi300x_cert.airflow_dags import build_recertify_dag, pool_specs
    from mi300x_cert.fleet import load_fleet

    server = load_fleet().servers[0]
    monkeypatch.setenv("MI300X_CERT_GPU_EXECUTOR", "EdgeExecutor")
    dag = build_recertify_dag(server, dag_id="recertify_edge_probe")
    assert dag.get_task("bare_metal").executor == "EdgeExecutor"
    monkeypatch.delenv("MI300X_CERT_GPU_EXECUTOR")
    dag = build_recertify_dag(server, dag_id="recertify_default_probe")
    assert dag.get_task("bare_metal").executor is None
    pools = {p["name"]: p["slots"] for p in pool_specs()}
    assert pools[f"gpu-{server.name}"] == server.cards


def test_parsing_opens_no_socket(monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError(f"DAG parsing tried to connect to {a}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    bag = _dagbag()
    assert bag.import_errors == {}
    assert len(bag.dags) >= 8


def test_parsing_imports_no_heavy_library(tmp_path):
    code = (
        "import json, sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(DAGS)!r})\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))\n"
        "print(json.dumps({'errors': {k: str(v) for k, v in bag.import_errors.items()}, 'dags': len(bag.dags), 'heavy': heavy}))\n"
    )
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == {}
    assert result["dags"] >= 8
    assert result["heavy"] == [], f"DAG parsing imported {result['heavy']}"


def test_fleet_errors_name_the_field(tmp_path):
    from mi300x_cert.errors import ProfileError
    from mi300x_cert.fleet import load_fleet

    bad = tmp_path / "fleet.yaml"
    bad.write_text("servers:\n  - name: a\n    profile: smoke\n    sku: smoke\n    cards: 4\n    schedule: 'every day'\n")
    with pytest.raises(ProfileError, match=r"servers\.0\.schedule"):
        load_fleet(bad)
    bad.write_text("servers:\n  - name: a\n    profile: smoke\n    sku: smoke\n    cards: 4\n    card_groups: {'[4-7]': '4-7'}\n")
    with pytest.raises(ProfileError, match=r"card_groups.*unknown card id"):
        load_fleet(bad)
    bad.write_text("servers:\n  - name: Bad_Name\n    profile: smoke\n    sku: smoke\n    cards: 4\n")
    with pytest.raises(ProfileError, match=r"servers\.0\.name"):
        load_fleet(bad)
    bad.write_text("servers:\n  - name: a\n    profile: smoke\n    sku: smoke\n    cards: 4\n    alerts: {email: [nobody]}\n")
    with pytest.raises(ProfileError, match=r"servers\.0\.alerts\.email"):
        load_fleet(bad)
    fleet = load_fleet()
    assert {"smoke-host", "mi300x-01", "h100-01"} <= set(fleet.names)
    assert fleet.server("smoke-host").queue == "gpu-smoke-host"
