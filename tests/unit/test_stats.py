"""Appendix A/B tables equal an independent recomputation with the statistics module."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from mi300x_cert.stats import TABLES, appendix_tables, long_table, order_batch_configs


def _rows(seed: int = 7) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for pc in (1, 2, 4):
        for bc in ("2x3", "1x4", "8x2", "5x5"):
            b, n = (int(x) for x in bc.split("x"))
            for rep in (1, 2):
                for proc in range(pc):
                    for i in range(n):
                        lat = b * (1.3 + 0.7 / b) * (1 + rnd.gauss(0, 0.02)) + 0.01 * pc
                        lo = lat + abs(rnd.gauss(0.004, 0.001))
                        rows.append({"process_count": pc, "batch_config": bc, "batch_size": b, "repetition": rep,
                                     "proc": proc, "batch_index": i, "latency_s": lat, "latency_overhead_s": lo,
                                     "per_image_s": lat / b, "per_image_overhead_s": lo / b, "status": "ok",
                                     "warmup": False})
                # warm-up and failed rows must be ignored
                rows.append({"process_count": pc, "batch_config": bc, "batch_size": b, "repetition": rep, "proc": 0,
                             "batch_index": 0, "latency_s": 999.0, "latency_overhead_s": 999.0, "per_image_s": 999.0,
                             "per_image_overhead_s": 999.0, "status": "ok", "warmup": True})
    rows.append({"process_count": 1, "batch_config": "1x4", "batch_size": 1, "repetition": 1, "proc": 0,
                 "batch_index": 9, "latency_s": -5.0, "latency_overhead_s": -5.0, "per_image_s": -5.0,
                 "per_image_overhead_s": -5.0, "status": "failed", "warmup": False})
    return rows


FUNCS = {"mean": statistics.fmean, "median": statistics.median, "std": statistics.stdev, "min": min, "max": max}


def test_tables_match_independent_recomputation():
    rows = _rows()
    tables = appendix_tables(rows, accelerator="AMD Instinct MI300X")
    assert set(tables) == set(TABLES)
    assert len(TABLES) == 15  # A: 5 stats; B: 5 stats × (plain, with overhead)
    for name, (column, _title) in TABLES.items():
        stat = name.split("_")[2]
        t = tables[name]
        assert t.index.name == "N-processes"
        assert list(t.index) == [1, 2, 4]
        assert list(t.columns) == ["Accelerator", "1x4", "2x3", "5x5", "8x2"]
        assert set(t["Accelerator"]) == {"AMD Instinct MI300X"}
        for pc in (1, 2, 4):
            for bc in ("1x4", "2x3", "5x5", "8x2"):
                vals = [r[column] for r in rows if r["process_count"] == pc and r["batch_config"] == bc
                        and not r["warmup"] and r["status"] == "ok"]
                b, n = (int(x) for x in bc.split("x"))
                assert len(vals) == pc * n * 2
                assert t.loc[pc, bc] == pytest.approx(FUNCS[stat](vals), rel=1e-12, abs=1e-15), (name, pc, bc)


def test_single_batch_cell_has_empty_std():
    rows = [{"process_count": 1, "batch_config": "4x1", "latency_s": 2.0, "latency_overhead_s": 2.1,
             "per_image_s": 0.5, "per_image_overhead_s": 0.525, "status": "ok", "warmup": False}]
    t = appendix_tables(rows, accelerator="x")
    assert math.isnan(t["appendix_b_std"].loc[1, "4x1"])
    assert t["appendix_b_mean"].loc[1, "4x1"] == 2.0 and t["appendix_a_max"].loc[1, "4x1"] == 0.5


def test_report_order_of_batch_configs():
    assert order_batch_configs(["128x4", "3x3", "1x512", "8x64", "1x2"]) == ["1x512", "8x64", "128x4", "1x2", "3x3"]


def test_warmup_read_back_from_csv_strings_is_excluded():
    rows = _rows()
    for r in rows:
        r["warmup"] = str(r["warmup"])  # as read back from CSV
    t = appendix_tables(rows)
    assert t["appendix_b_max"].drop(columns="Accelerator").max().max() < 100
    assert set(t["appendix_a_mean"]["Accelerator"]) == {"unknown"}


def test_long_table_counts():
    lt = long_table(_rows())
    sel = lt[(lt.process_count == 2) & (lt.batch_config == "5x5") & (lt.metric == "latency_s")]
    assert int(sel["count"].iloc[0]) == 2 * 5 * 2


def test_truthy_reads_csv_flags_one_way_everywhere():
    import math

    import pandas as pd

    from mi300x_cert.stats import truthy

    assert [truthy(v) for v in ("True", "true", " 1 ", "yes", "t", 1, 2.0, True)] == [True] * 8
    assert [truthy(v) for v in ("False", "0", "", "no", 0, 0.0, math.nan, None, pd.NA)] == [False] * 9
