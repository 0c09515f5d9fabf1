"""History per GPU serial: rows from a run directory, the JSON-lines index, the CLI, the wiring."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

from fake_run import make_fake_run  # noqa: E402

from mi300x_cert import history  # noqa: E402
from mi300x_cert.cli import main  # noqa: E402
from mi300x_cert.errors import CertError  # noqa: E402

HOT = 13


@pytest.fixture(scope="module")
def hot_run(tmp_path_factory) -> Path:
    """A fake run where card 13 runs 30 °C hot, validated by the real thermal suite."""
    from mi300x_cert.validation import validate

    root = make_fake_run(tmp_path_factory.mktemp("hot") / "run", hot_card=HOT)
    validate(root, "thermal")
    return root


@pytest.fixture(autouse=True)
def _state(tmp_path, monkeypatch):
    monkeypatch.setenv("MI300X_CERT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("MI300X_CERT_HISTORY_DIR", raising=False)
    monkeypatch.delenv("MI300X_CERT_OUTCOMES_DIR", raising=False)


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _expected(root: Path, card: int) -> dict:
    """The card's numbers computed straight from the CSVs: phase segments from the event markers."""
    # one events/telemetry file per bare-metal group; the groups follow each other in time
    marks = sorted((e for f in sorted((root / "events").glob("bare-metal*.csv")) for e in _csv(f) if e["kind"] == "phase"),
                   key=lambda e: float(e["t"]))
    segs = [(float(m["t"]), float(marks[i + 1]["t"]) if i + 1 < len(marks) else float("inf"), m["phase"],
             json.loads(m["cards"])) for i, m in enumerate(marks)]
    idle_j, act_j, act_p = [], [], []
    mem = []
    for r in (r for f in sorted((root / "telemetry").glob("bare-metal*.csv")) for r in _csv(f)):
        if int(r["card"]) != card:
            continue
        mem.append(float(r["memory_c"]))
        t = float(r["t"])
        for t0, t1, phase, cards in segs:
            if t0 <= t < t1:
                if phase == "idle":
                    idle_j.append(float(r["junction_c"]))
                elif phase == "active" and card in cards:
                    act_j.append(float(r["junction_c"]))
                    act_p.append(float(r["power_w"]))
    sd = [float(r["per_image_s"]) for r in _csv(root / "results" / "sd-throughput" / "rows.csv")
          if int(r["card"]) == card and r["status"] == "ok"]
    return {"idle_junction_mean_c": statistics.fmean(idle_j) if idle_j else None,
            "active_junction_p95_c": float(np.percentile(act_j, 95)) if act_j else None,
            "active_power_mean_w": statistics.fmean(act_p) if act_p else None,
            "memory_max_c": max(mem) if mem else None,
            "sd_per_image_median_s": statistics.median(sd) if sd else None}


def test_rows_name_the_card_and_match_the_telemetry(hot_run):
    rows = history.card_history_rows(hot_run)
    assert [r["card"] for r in rows] == list(range(16))
    by_card = {r["card"]: r for r in rows}
    for card in (0, HOT, 5):  # loaded + ran SD; hot; never loaded in bare-metal (group cards 0-3, 12-15)
        r, want = by_card[card], _expected(hot_run, card)
        assert r["serial"] == f"SIM{card:04d}" and r["host"] == "fake-host" and r["run_id"] == "fake-run"
        assert r["bus_id"] == f"0000:{card:02x}:00.0"
        for key, value in want.items():
            if value is None:
                assert r[key] is None, (card, key)
            else:
                assert r[key] == pytest.approx(value, rel=1e-9), (card, key)
    assert by_card[5]["active_junction_p95_c"] is None and by_card[5]["active_power_mean_w"] is None
    assert by_card[5]["idle_junction_mean_c"] is not None
    assert by_card[HOT]["active_junction_p95_c"] > by_card[12]["active_junction_p95_c"] + 20
    assert by_card[HOT]["sd_per_image_median_s"] is None  # sd-throughput of the fake run uses cards 0-3
    assert by_card[0]["sd_batches"] > 0


def test_hot_card_failures_appear_in_its_row_only(hot_run):
    rows = history.card_history_rows(hot_run)
    named = {r["card"]: r["failures"] for r in rows if r["failures"]}
    assert list(named) == [HOT]
    assert named[HOT][0]["suite"] == "thermal" and f"card {HOT} active" in named[HOT][0]["reason"]
    assert [r["card"] for r in rows if r["card_ok"] is False] == [HOT]
    assert all(r["certified"] is False for r in rows)


def test_missing_data_is_none_not_zero(tmp_path):
    root = make_fake_run(tmp_path / "run", broken_sensor_card=5, disabled=["sd-throughput"])
    rows = {r["card"]: r for r in history.card_history_rows(root)}
    assert rows[5]["idle_junction_mean_c"] is None and rows[5]["active_junction_p95_c"] is None
    assert rows[5]["memory_max_c"] is not None  # the memory sensor still reads
    assert rows[0]["sd_per_image_median_s"] is None and rows[0]["sd_batches"] is None
    assert rows[0]["certified"] is None and rows[0]["card_ok"] is None  # not validated yet
    with pytest.raises(history.HistoryError, match="inventory.json"):
        history.card_history_rows(tmp_path)


def test_record_twice_is_idempotent(hot_run, tmp_path):
    index = tmp_path / "idx"
    history.record_run(hot_run, index)
    first = (index / "SIM0013.jsonl").read_text().splitlines()
    history.record_run(hot_run, index)
    second = (index / "SIM0013.jsonl").read_text().splitlines()
    assert len(first) == len(second) == 1
    a, b = json.loads(first[0]), json.loads(second[0])
    a.pop("recorded"), b.pop("recorded")
    assert a == b
    assert len(list(index.glob("*.jsonl"))) == 16
    assert not list(index.glob(".*.tmp"))


def _moved(src: Path, dst: Path, *, host: str, run_id: str, started: str, serial_at: dict[int, str]) -> Path:
    """A copy of ``src`` as if run on another host later, with some serials moved to other slots."""
    shutil.copytree(src, dst)
    inv = json.loads((dst / "inventory.json").read_text())
    inv["host"] = host
    for c in inv["cards"]:
        c["serial"] = serial_at.get(c["index"], f"{host}-{c['index']}")
    (dst / "inventory.json").write_text(json.dumps(inv))
    meta = json.loads((dst / "run.json").read_text())
    meta.update(host=host, run_id=run_id, started=started)
    (dst / "run.json").write_text(json.dumps(meta))
    return dst


def test_same_serial_on_two_hosts_both_show(hot_run, tmp_path):
    index = tmp_path / "idx"
    later = _moved(hot_run, tmp_path / "later", host="mi300x-02", run_id="run-2", started="2026-12-01T00:00:00+00:00",
                   serial_at={2: f"SIM{HOT:04d}"})
    (later / "validation").rename(later / "validation-old")  # the later run passed (no failures)
    (later / "outcome.json").write_text(json.dumps({"certified": True}))
    history.record_run(later, index)
    history.record_run(hot_run, index)
    rows = history.card_history(f"SIM{HOT:04d}", index)
    assert [(r["host"], r["card"], r["run_id"], r["certified"]) for r in rows] == [
        ("fake-host", HOT, "fake-run", False), ("mi300x-02", 2, "run-2", True)]
    assert rows[0]["failures"] and not rows[1]["failures"]
    # the later row carries card 2's numbers (the slot it sat in), not card 13's
    assert rows[1]["active_junction_p95_c"] == pytest.approx(_expected(hot_run, 2)["active_junction_p95_c"])
    listed = {s["serial"]: s for s in history.list_serials(index)}
    assert listed[f"SIM{HOT:04d}"]["runs"] == 2 and listed[f"SIM{HOT:04d}"]["last_host"] == "mi300x-02"


def test_unknown_serial_is_one_clear_error(hot_run, tmp_path):
    index = tmp_path / "idx"
    history.record_run(hot_run, index)
    with pytest.raises(history.UnknownSerialError) as e:
        history.card_history("NOPE-42", index)
    assert isinstance(e.value, CertError)
    assert "NOPE-42" in str(e.value) and "16 serials known" in str(e.value)
    with pytest.raises(history.UnknownSerialError, match="0 serials known"):
        history.card_history("NOPE-42", tmp_path / "empty")


def test_odd_serials_get_distinct_files(hot_run, tmp_path):
    src = _moved(hot_run, tmp_path / "odd", host="h", run_id="r", started="2026-12-02T00:00:00+00:00",
                 serial_at={0: "A/B", 1: "A_B", 2: "../x"})
    index = tmp_path / "idx"
    history.record_run(src, index)
    assert history.card_history("A/B", index)[0]["card"] == 0
    assert history.card_history("A_B", index)[0]["card"] == 1
    assert history.card_history("../x", index)[0]["card"] == 2
    assert all(p.parent == index for p in index.glob("*.jsonl"))


def test_cli_lists_serials_and_prints_one(hot_run, tmp_path, capsys):
    index = tmp_path / "idx"
    history.record_run(hot_run, index)
    assert main(["history", "--index", str(index)]) == 0
    out = capsys.readouterr().out
    assert "SIM0013" in out and "SIM0000" in out and "NO" in out
    assert main(["history", f"SIM{HOT:04d}", "--index", str(index)]) == 0
    out = capsys.readouterr().out
    assert f"SIM{HOT:04d}" in out and "fake-host" in out and "fake-run" in out and "NO" in out
    assert "junction_p95_c" in out  # the failure that named the card
    assert main(["history", f"SIM{HOT:04d}", "--index", str(index), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["serial"] == f"SIM{HOT:04d}" and data[0]["certified"] is False
    assert main(["history", "NOPE", "--index", str(index)]) == 2
    assert "unknown serial 'NOPE'" in capsys.readouterr().err


def test_default_index_is_under_the_state_dir(hot_run, tmp_path):
    history.record_run(hot_run)
    assert (tmp_path / "state" / "history" / "SIM0000.jsonl").is_file()
    assert history.card_history("SIM0000")[0]["card"] == 0
