"""The report: seven non-trivial PNGs, one self-contained HTML page with the tables and verdicts;
missing inputs become placeholders, never a crash."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

from fake_run import make_fake_run  # noqa: E402

from mi300x_cert.report import build_report  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _fake_verdicts(root: Path) -> None:
    (root / "validation").mkdir(parents=True, exist_ok=True)
    (root / "validation" / "verdicts.json").write_text(json.dumps({
        "success": False, "thresholds": "smoke", "data_docs": "validation/gx/uncommitted/data_docs/local_site/index.html",
        "run_problems": [{"suite": "run", "expectation": "run_complete",
                          "reason": "run state is 'failed', not 'complete': interrupted (SIGTERM) during whisper"}],
        "suites": {
            "thermal": {"suite": "thermal", "success": False, "status": "failed", "evaluated": 15, "declared": 15,
                        "failures": [{"suite": "thermal", "expectation": "active_band", "subject": "card 13 active",
                                      "card": 13, "column": "junction_p95_c", "observed": 81.2, "unit": "°C",
                                      "expected": "between 40.0 °C (104.0 °F) and 70.0 °C (158.0 °F)",
                                      "reason": "card 13 active: junction_p95_c = 81.2 °C (178.2 °F)"}]},
            "whisper": {"suite": "whisper", "success": True, "status": "skipped", "reason": "skipped: experiment disabled",
                        "failures": []},
        }}))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = make_fake_run(tmp_path_factory.mktemp("rep") / "run")
    _fake_verdicts(root)
    return root, build_report(root)


def test_every_figure_is_a_nontrivial_png(report):
    root, _ = report
    for n in range(1, 8):
        p = root / "report" / f"figure{n}.png"
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 20_000, (p, len(data))


def test_html_is_self_contained_with_tables_and_verdicts(report):
    root, path = report
    assert path == root / "report" / "index.html"
    page = path.read_text()
    assert page.count("data:image/png;base64,") == 7
    assert "<img" in page and 'src="figure' not in page  # nothing loaded from outside the page
    for text in ("Appendix A", "Appendix B", "Mean of normalized inference latency per image",
                 "Median batch inference latency with overhead", "Whisper token throughput", "ResNet-50 throughput",
                 "Inventory", "SIM0015", "Conditions", "network_mode"):
        assert text in page, text
    # verdicts with observed vs expected, in °C and °F
    assert "FAIL" in page and "card 13 active" in page and "81.2 °C (178.2 °F)" in page
    assert "between 40.0 °C (104.0 °F) and 70.0 °C (158.0 °F)" in page
    assert "skipped: experiment disabled" in page
    assert "run state is &#x27;failed&#x27;, not &#x27;complete&#x27;: interrupted (SIGTERM) during whisper" in page
    # the thermal summary speaks both units
    assert "junction mean °C" in page and "junction mean °F" in page


def test_not_validated_and_missing_inputs_degrade(tmp_path):
    root = make_fake_run(tmp_path / "run", disabled=["sd-throughput"])
    for d in ("network",):
        for f in (root / d).glob("*.csv"):
            f.unlink()
    path = build_report(root)
    page = path.read_text()
    assert "not validated" in page
    assert "not drawn" in page and "network counters" in page and "stats/sd_throughput_long.csv" in page
    for n in range(1, 8):
        assert (root / "report" / f"figure{n}.png").read_bytes().startswith(PNG)
