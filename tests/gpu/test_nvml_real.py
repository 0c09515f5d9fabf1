"""NVML backend on a real NVIDIA card (opt-in: ``pytest -m gpu tests/gpu/test_nvml_real.py``)."""

from __future__ import annotations

import time

import pytest

from mi300x_cert.config import TelemetrySpec
from mi300x_cert.rundir import CsvStream
from mi300x_cert.telemetry import EVENT_COLUMNS, TELEMETRY_COLUMNS, Sampler, open_backend

pytestmark = pytest.mark.gpu


def test_nvml_devices_and_samples_are_plausible(tmp_path):
    with open_backend(TelemetrySpec(backend="nvml")) as b:
        devs = b.devices()
        assert devs and all(d["vendor"] == "NVIDIA" and d["name"] for d in devs)
        assert all(d["bus_id"] and d["uuid"] and d["uuid"].startswith("GPU-") for d in devs)
        first = b.sample()
        time.sleep(0.5)
        second = b.sample()
        versions = b.versions()
        tel = CsvStream(tmp_path / "t.csv", TELEMETRY_COLUMNS)
        ev = CsvStream(tmp_path / "e.csv", EVENT_COLUMNS)
        s = Sampler(b, tel, ev, rate_hz=10).start()
        s.phase("idle", cards=b.cards)
        time.sleep(1.0)
        s.stop()
        tel.close(), ev.close()
    assert versions["driver_version"] and versions["cuda_driver_version"]
    for r in first:
        assert list(r) == TELEMETRY_COLUMNS
        assert 10.0 <= r["junction_c"] <= 100.0, r
        assert r["memory_c"] is None or 10.0 <= r["memory_c"] <= 110.0, r
        assert 10.0 <= r["power_w"] <= 1200.0, r
        assert 0 < r["mem_used_bytes"] <= r["mem_total_bytes"], r
        assert r["mem_total_bytes"] > 8 * 1024**3
        assert 0.0 <= r["util_pct"] <= 100.0
        assert r["sclk_mhz"] and r["sclk_mhz"] > 0 and r["mclk_mhz"] and r["mclk_mhz"] > 0
        assert r["throttle"] in (True, False)
        assert r["edge_c"] is None  # NVML has no edge sensor
    for a, b2 in zip(first, second):
        if a["energy_j"] is not None:
            assert b2["energy_j"] >= a["energy_j"]
    assert s.errors == 0 and 5 <= s.samples <= 15
