"""Thresholds per (SKU, workload path): the set a profile is judged by, no fallback between paths,
and the h100-optimized Whisper floor catching a card at half its measured rate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from mi300x_cert.config import PROFILES_DIR, load_profile
from mi300x_cert.errors import ProfileError
from mi300x_cert.validation import format_verdict, load_params, validate

MEASURED_TOK_S = 8043.0  # h100-optimized through the engine (docs/performance.md)


def test_a_profile_is_judged_by_its_sku_and_path():
    assert load_profile("h100").thresholds_set == "h100"
    assert load_profile("h100-optimized").thresholds_set == "h100-optimized"
    assert load_profile("h200").thresholds_set == "h200"
    assert load_profile("h200-optimized").thresholds_set == "h200-optimized"
    assert load_profile("smoke").thresholds_set == "smoke"
    # an explicit thresholds set still wins
    assert load_profile("smoke", overrides={"path": "optimized", "thresholds": "smoke"}).thresholds_set == "smoke"


def test_optimized_floor_is_its_own_not_the_stock_one():
    stock, opt = load_params("h100"), load_params("h100-optimized")
    assert opt["whisper"]["min_tokens_per_s"] > 20 * stock["whisper"]["min_tokens_per_s"]
    assert opt["whisper"]["min_tokens_per_s"] > 0.5 * MEASURED_TOK_S


def test_missing_set_for_sku_and_path_is_an_error_naming_both(tmp_path):
    from mi300x_cert.experiments import prepare_run

    prof = yaml.safe_load((PROFILES_DIR / "smoke.yaml").read_text())
    prof["path"] = "optimized"
    path = tmp_path / "smoke-opt.yaml"
    path.write_text(yaml.safe_dump(prof))
    with pytest.raises(ProfileError) as e:
        prepare_run(path, tmp_path / "run")
    msg = str(e.value)
    assert "SKU 'smoke'" in msg and "path 'optimized'" in msg and "smoke-optimized.yaml" in msg
    assert not (tmp_path / "run").exists()


def test_empty_matrix_is_a_profile_error(tmp_path):
    with pytest.raises(ProfileError) as e:
        load_profile("smoke", overrides={"experiments": {"sd-throughput": {"batch_configs": []}}})
    assert "batch_configs" in str(e.value) and "empty" in str(e.value)


def _whisper_run(root: Path, rate: float) -> Path:
    """A run directory of profile h100-optimized holding Whisper rows recorded at ``rate`` tokens/s
    (its plan: one case r1, 1,536 clips in batches of 512, 128 tokens per clip)."""
    prof = yaml.safe_load((PROFILES_DIR / "h100-optimized.yaml").read_text())
    for name in ("bare-metal", "sd-throughput", "resnet50"):
        prof["experiments"][name]["enabled"] = False
    root.mkdir(parents=True)
    (root / "profile.yaml").write_text(yaml.safe_dump(prof))
    (root / "run.json").write_text(json.dumps({"run_id": "opt-run", "host": "h100-host", "profile": "h100-optimized",
                                               "sku": "h100", "state": "complete", "experiments": {}}))
    spec = prof["experiments"]["whisper"]
    bs, tokens = spec["batch_size"], spec["new_tokens"]
    n_batches = spec["clips"] // bs
    rows, t = [], 1_764_000_000.0
    per_batch = bs * tokens / rate
    for i in range(n_batches):
        rows.append({"experiment": "whisper", "case_id": "r1", "batch_index": i, "t_start": t, "t_end": t + per_batch,
                     "latency_s": per_batch, "items": bs, "tokens": bs * tokens, "status": "ok", "warmup": False})
        t += per_batch
    d = root / "results" / "whisper"
    (d / "cases").mkdir(parents=True)
    with open(d / "rows.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (d / "cases" / "r1.json").write_text(json.dumps({"case_id": "r1", "status": "ok"}))
    # the experiment's own table, by its own finalize code (the verdict reads it)
    import types

    import pandas as pd

    from mi300x_cert.config import Profile
    from mi300x_cert.experiments import get_experiment

    get_experiment("whisper").summarize(types.SimpleNamespace(root=root), Profile.model_validate(prof),
                                        pd.DataFrame(rows), "NVIDIA H100")
    return root


def test_h100_optimized_at_half_its_whisper_rate_fails(tmp_path):
    ok = validate(_whisper_run(tmp_path / "full", MEASURED_TOK_S), "whisper")
    assert ok["success"] is True, format_verdict(ok)
    assert ok["thresholds"] == "h100-optimized"
    v = validate(_whisper_run(tmp_path / "half", 0.5 * MEASURED_TOK_S), "whisper")
    assert v["success"] is False
    f = [x for x in v["failures"] if x["expectation"] == "tokens_per_s_floor"]
    assert len(f) == 1 and f[0]["observed"] == pytest.approx(0.5 * MEASURED_TOK_S, rel=1e-6)
    # under the stock set (the rubber stamp this replaces) the same rows would have passed
    assert 0.5 * MEASURED_TOK_S > load_params("h100")["whisper"]["min_tokens_per_s"]
