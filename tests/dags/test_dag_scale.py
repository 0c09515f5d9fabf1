"""The recertification DAGs of a generated fleet: sharded over the DAG files, one identical task graph per host."""

from __future__ import annotations

import copy
import importlib.util
import pickle
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"


def _bench():
    spec = importlib.util.spec_from_file_location("dag_parse_bench", REPO / "bench" / "dag_parse.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _dagbag(folder: Path):
    from airflow.dag_processing.dagbag import DagBag

    try:
        return DagBag(dag_folder=str(folder), include_examples=False)
    except TypeError:
        return DagBag(dag_folder=str(folder))


def _recertify_folder(tmp_path: Path, files: list[Path] | None = None) -> Path:
    folder = tmp_path / "dags"
    folder.mkdir()
    for f in files if files is not None else sorted(DAGS.glob("recertify*.py")):
        (folder / f.name).symlink_to(f)
    return folder


def _graph(dag) -> dict:
    """The host-independent shape of a recertification DAG."""
    return {
        t.task_id: {
            "type": type(t).__name__,
            "upstream": sorted(t.upstream_task_ids),
            "downstream": sorted(t.downstream_task_ids),
            "trigger_rule": str(t.trigger_rule),
            "retries": t.retries,
            "mapped": bool(getattr(t, "is_mapped", False)),
            "gpu": t.pool_slots > 1 or t.pool != "default_pool",
        }
        for t in dag.tasks
    }


def test_generated_50_host_fleet_parses_to_50_identical_dags(tmp_path, monkeypatch):
    from mi300x_cert.airflow_dags import EXPERIMENTS, RECERTIFY_SHARDS, recertify_shard, recertify_shard_file
    from mi300x_cert.fleet import load_fleet

    fleet_file = _bench().write_fleet(50, tmp_path / "fleet.yaml")
    monkeypatch.setenv("MI300X_CERT_FLEET", str(fleet_file))
    fleet = load_fleet()
    assert len(fleet.servers) == 50

    bag = _dagbag(_recertify_folder(tmp_path))
    assert bag.import_errors == {}, bag.import_errors
    assert sorted(bag.dag_ids) == sorted(f"recertify_{s.name}" for s in fleet.servers)

    reference = None
    files = set()
    for s in fleet.servers:
        dag = bag.dags[f"recertify_{s.name}"]
        graph = _graph(dag)
        reference = reference or graph
        assert graph == reference, f"{dag.dag_id}: task graph differs from the first host's"
        # one chain per experiment plugin, one validation task per suite, the tail (report … register)
        assert len(dag.tasks) == len(reference) and {"preflight", "register"} <= set(graph)
        # host-specific settings follow the fleet entry
        assert getattr(dag.timetable, "expression", None) == s.schedule
        assert {f"host:{s.name}", f"sku:{s.sku}"} <= set(dag.tags)
        for tid in ("preflight", "bare_metal", "run_sd_case", "whisper", "resnet50"):
            t = dag.get_task(tid)
            assert (t.queue, t.pool, t.pool_slots) == (f"gpu-{s.name}", f"gpu-{s.name}", s.cards)
        assert dag.get_task("report").queue == f"gpu-{s.name}"
        assert dict(dag.params) == {"experiments": list(EXPERIMENTS), "overrides": {}}
        # in the file of its shard
        assert Path(dag.fileloc).name == recertify_shard_file(recertify_shard(s.name))
        files.add(Path(dag.fileloc).name)
    assert len(files) == RECERTIFY_SHARDS  # the 50 generated names reach every shard file


def test_shard_files_match_the_shard_count():
    from mi300x_cert.airflow_dags import RECERTIFY_SHARDS, recertify_shard_file, recertify_shard_of_file

    expected = {recertify_shard_file(k) for k in range(RECERTIFY_SHARDS)}
    assert {f.name for f in DAGS.glob("recertify*.py")} == expected
    for name in expected:
        text = (DAGS / name).read_text()
        assert "build_recertify_dags(dag_file=__file__)" in text, name
        assert recertify_shard_of_file(DAGS / name) == (0 if name == "recertify.py" else int(name[10:-3]))
    for bad in ("recertify_0.py", f"recertify_{RECERTIFY_SHARDS}.py", "recertify_x.py", "manual_certify.py"):
        with pytest.raises(ValueError, match="not a recertification DAG file"):
            recertify_shard_of_file(bad)


def test_shard_of_a_host_is_stable():
    """Changing the hash (or the count) moves DAGs between files: it must be a deliberate change."""
    from mi300x_cert.airflow_dags import RECERTIFY_SHARDS, build_recertify_dags, recertify_shard
    from mi300x_cert.fleet import load_fleet

    assert RECERTIFY_SHARDS == 16
    assert {h: recertify_shard(h) for h in ("smoke-host", "mi300x-01", "h100-01")} == {
        "smoke-host": 11, "mi300x-01": 0, "h100-01": 9}
    fleet = load_fleet()
    union: dict = {}
    for k in range(RECERTIFY_SHARDS):
        part = build_recertify_dags(fleet, shard=k)
        assert not set(part) & set(union)
        union.update(part)
    assert set(union) == set(build_recertify_dags(fleet))
    with pytest.raises(ValueError, match="out of range"):
        build_recertify_dags(fleet, shard=RECERTIFY_SHARDS)


def test_missing_shard_file_is_an_import_error(tmp_path, monkeypatch):
    from mi300x_cert.airflow_dags import recertify_shard, recertify_shard_file

    bench = _bench()
    fleet_file = bench.write_fleet(50, tmp_path / "fleet.yaml")
    monkeypatch.setenv("MI300X_CERT_FLEET", str(fleet_file))
    bag = _dagbag(_recertify_folder(tmp_path, [DAGS / "recertify.py", DAGS / "recertify_1.py"]))
    (err,) = bag.import_errors.values()
    assert "recertification DAG file(s) missing beside recertify.py" in err
    missing = err.split("missing beside recertify.py:")[1]
    for s in bench.fleet_servers(50):
        f = recertify_shard_file(recertify_shard(s["name"]))
        assert (f"{f} (hosts " in missing) == (f not in ("recertify.py", "recertify_1.py")), f


def test_params_schemas_are_shared_read_only_and_still_validate():
    from airflow.sdk.definitions.param import ParamsDict

    from mi300x_cert.airflow_dags import _recertify_params

    a, b = _recertify_params(), _recertify_params()
    assert a["experiments"] is not b["experiments"] and a["experiments"].schema is b["experiments"].schema
    schema = a["experiments"].schema
    assert copy.deepcopy(schema) is schema and pickle.loads(pickle.dumps(schema)) == schema
    for mutate in (lambda s: s.__setitem__("type", "string"), lambda s: s["items"].update(enum=[]),
                   lambda s: s.pop("minItems"), lambda s: s.clear()):
        with pytest.raises(TypeError, match="read-only"):
            mutate(schema)
    params = ParamsDict(copy.deepcopy(a))
    params["experiments"] = ["whisper"]  # a good conf value
    for bad in (["nope"], [], ["whisper", "whisper"], "whisper"):
        with pytest.raises(Exception, match="experiments"):
            params["experiments"] = bad
    with pytest.raises(Exception, match="overrides"):
        params["overrides"] = ["not", "an", "object"]
    # each DAG's values are its own
    a["experiments"].value.append("x")
    from mi300x_cert.airflow_dags import EXPERIMENTS

    assert b["experiments"].value == list(EXPERIMENTS)
