"""Inventory: host, cards from the telemetry backend, versions without importing heavy libraries."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys

import pytest
import yaml

from mi300x_cert import cli
from mi300x_cert.config import REPO_ROOT, Profile
from mi300x_cert.errors import TelemetryError
from mi300x_cert.inventory import collect_inventory, git_revision, library_versions, torch_runtime

SMALL = {
    "name": "inv-test",
    "sku": "mi300x",
    "host": {"name": "box-a", "cards": 4, "xgmi_domains": [[0, 1], [2, 3]]},
    "experiments": {"bare-metal": {"groups": ["[0-1]"]}},
}


def profile(**over) -> Profile:
    data = json.loads(json.dumps(SMALL))
    for k, v in over.items():
        data[k] = v
    return Profile.model_validate(data)


def test_inventory_of_the_simulated_box():
    inv = collect_inventory(profile())
    assert inv["profile"] == "inv-test" and inv["sku"] == "mi300x"
    assert inv["host"]["profile_host"] == "box-a" and inv["host"]["name"]
    assert inv["os"]["system"] and inv["cpu"]["logical_cores"] >= 1
    assert inv["telemetry_backend"] == "simulated" and inv["telemetry_error"] is None
    assert [c["index"] for c in inv["cards"]] == [0, 1, 2, 3] and inv["card_count"] == 4
    assert [c["serial"] for c in inv["cards"]] == [f"SIM-MI300X-{i:04d}" for i in range(4)]
    assert all(c["bus_id"] and c["uuid"] for c in inv["cards"])
    assert [c["domain"] for c in inv["cards"]] == [0, 0, 1, 1]
    assert inv["interconnect_domains"] == [[0, 1], [2, 3]]
    assert inv["versions"]["driver"] == "simulated"
    json.dumps(inv)  # JSON-able as written to inventory.json


def test_sixteen_card_default_has_two_xgmi_domains():
    inv = collect_inventory(Profile.model_validate({"name": "x", "sku": "mi300x"}))
    assert inv["interconnect_domains"] == [list(range(8)), list(range(8, 16))]


def test_library_versions_come_from_metadata():
    libs = library_versions()
    for key, dist in (("torch", "torch"), ("diffusers", "diffusers"), ("transformers", "transformers"),
                      ("great_expectations", "great-expectations"), ("airflow", "apache-airflow"), ("boto3", "boto3")):
        try:
            expected = md.version(dist)
        except md.PackageNotFoundError:
            expected = None
        assert libs[key] == expected
    assert libs["pydantic"]  # installed with the package


def test_collecting_imports_no_heavy_library():
    code = ("import sys, json; from mi300x_cert.config import Profile; from mi300x_cert.inventory import collect_inventory;"
            "inv = collect_inventory(Profile.model_validate({'name': 'x', 'sku': 'mi300x'}));"
            "heavy = ('torch', 'diffusers', 'transformers', 'great_expectations', 'airflow', 'boto3', 'amdsmi', 'pynvml');"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert json.loads(out) == []


def test_torch_runtime_is_read_without_importing_torch():
    rt = torch_runtime()
    assert set(rt) == {"cuda", "hip", "git_version"}
    if library_versions()["torch"] and "+cpu" in library_versions()["torch"]:
        assert rt["cuda"] is None and rt["hip"] is None and rt["git_version"]


def test_git_revision_matches_the_checkout(monkeypatch, tmp_path):
    r = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    rev = git_revision()
    assert rev["sha"] == r.stdout.strip() and len(rev["sha"]) == 40 and rev["dirty"] in (True, False)
    monkeypatch.setenv("MI300X_CERT_GIT_SHA", "abc123")
    assert git_revision(tmp_path) == {"sha": "abc123", "dirty": None}  # no checkout there


def test_unavailable_backend_raises_or_is_recorded(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_amdsmi(name, *a, **k):
        if name == "amdsmi":
            raise KeyError("libamd_smi.so")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_amdsmi)
    prof = profile(telemetry={"backend": "amdsmi"})
    with pytest.raises(TelemetryError, match="amdsmi backend unavailable"):
        collect_inventory(prof)
    inv = collect_inventory(prof, strict=False)
    assert inv["cards"] == [] and "libamd_smi" in inv["telemetry_error"]
    assert inv["libraries"] and inv["os"]


def test_cli_inventory_prints_json(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    assert cli.main(["inventory", "--profile", str(path)]) == 0
    inv = json.loads(capsys.readouterr().out)
    assert inv["card_count"] == 4 and inv["cards"][2]["serial"] == "SIM-MI300X-0002"


def test_cli_inventory_with_an_unavailable_backend_exits_2(tmp_path, capsys):
    data = dict(SMALL, telemetry={"backend": "nvml"})
    path = tmp_path / "nv.yaml"
    path.write_text(yaml.safe_dump(data))
    import ctypes.util

    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("an NVIDIA driver is present")
    assert cli.main(["inventory", "--profile", str(path)]) == 2
    assert "nvml backend unavailable" in capsys.readouterr().err


def test_cli_inventory_smoke_profile_when_shipped(capsys):
    if not (REPO_ROOT / "include" / "profiles" / "smoke.yaml").is_file():
        pytest.skip("include/profiles/smoke.yaml not shipped yet")
    assert cli.main(["inventory", "--profile", "smoke"]) == 0
    inv = json.loads(capsys.readouterr().out)
    assert inv["profile"] == "smoke" and inv["card_count"] >= 1
