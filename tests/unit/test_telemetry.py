"""Telemetry: column contract, simulated thermal model, amdsmi/NVML backends on recorded fakes, sampler."""

from __future__ import annotations

import csv
import enum
import json
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from mi300x_cert.config import Profile, TelemetrySpec
from mi300x_cert.errors import CardError, TelemetryError
from mi300x_cert.rundir import CsvStream
from mi300x_cert.telemetry import EVENT_COLUMNS, TELEMETRY_COLUMNS, Sampler, TelemetryBackend, open_backend

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def c_to_f(c: float) -> float:
    return c * 9 / 5 + 32


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def sim_spec(**simulated) -> TelemetrySpec:
    return TelemetrySpec.model_validate({"backend": "simulated", "simulated": simulated})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- contract ---------------------------------------------------------------------------------
def test_columns_match_the_architecture_contract():
    assert TELEMETRY_COLUMNS == ["t", "elapsed_s", "card", "phase", "util_pct", "mem_used_bytes", "mem_total_bytes",
                                 "mem_used_pct", "junction_c", "edge_c", "memory_c", "power_w", "energy_j", "sclk_mhz",
                                 "mclk_mhz", "throttle", "throttle_reasons"]
    assert EVENT_COLUMNS == ["t", "elapsed_s", "kind", "phase", "cards", "card", "proc", "case_id", "batch_index",
                             "batch_size"]


def test_import_loads_no_vendor_library_and_no_torch():
    code = ("import sys, mi300x_cert.telemetry, mi300x_cert.telemetry.amdsmi_backend, "
            "mi300x_cert.telemetry.nvml_backend, mi300x_cert.network, mi300x_cert.inventory;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('amdsmi','pynvml','torch','psutil')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_backend_and_unopened_backend_raise_telemetry_error():
    with pytest.raises(TelemetryError, match="rocm"):
        open_backend("rocm")
    b = open_backend(sim_spec())
    with pytest.raises(TelemetryError, match="not open"):
        b.sample()


# ---- simulated ---------------------------------------------------------------------------------
def test_simulated_devices_are_a_16_card_box_with_two_xgmi_domains():
    with open_backend(sim_spec(), clock=FakeClock()) as b:
        assert isinstance(b, TelemetryBackend)
        devs = b.devices()
    assert [d["index"] for d in devs] == list(range(16))
    assert {d["name"] for d in devs} == {"AMD Instinct MI300X (simulated)"}
    assert devs[3]["serial"] == "SIM-MI300X-0003"
    assert len({d["bus_id"] for d in devs}) == 16 and len({d["uuid"] for d in devs}) == 16
    assert [d["domain"] for d in devs] == [0] * 8 + [1] * 8
    assert set(devs[0]) >= {"index", "name", "vendor", "serial", "bus_id", "domain", "uuid"}


def test_simulated_uses_profile_card_count_and_domains():
    prof = Profile.model_validate({"name": "t", "sku": "mi300x", "host": {"cards": 4, "xgmi_domains": [[0, 1], [2, 3]]},
                                   "experiments": {"bare-metal": {"groups": ["[0-1]"]}}})
    with open_backend(prof.telemetry, cards=[1, 3], host_cards=prof.host.card_ids, domains=prof.host.xgmi_domains,
                      clock=FakeClock()) as b:
        assert [d["index"] for d in b.devices()] == [1, 3]
        assert [d["domain"] for d in b.devices()] == [0, 1]
        assert [r["card"] for r in b.sample()] == [1, 3]
    with pytest.raises(CardError, match="7"):
        with open_backend(prof.telemetry, cards=[7], host_cards=prof.host.card_ids, clock=FakeClock()):
            pass


def test_simulated_idle_readings_are_in_the_report_idle_band():
    with open_backend(sim_spec(), clock=FakeClock()) as b:
        rows = b.sample()
    assert len(rows) == 16
    for r in rows:
        assert list(r) == TELEMETRY_COLUMNS
        assert 34.0 <= r["junction_c"] <= 37.0
        assert 88.0 <= c_to_f(r["junction_c"]) <= 100.0
        assert r["memory_c"] < r["junction_c"] and r["edge_c"] < r["junction_c"]
        assert 130.0 <= r["power_w"] <= 150.0
        assert r["util_pct"] == 0.0
        assert r["throttle"] is False
        assert 0 < r["mem_used_bytes"] < r["mem_total_bytes"]
    # small deterministic per-card offsets
    assert len({r["junction_c"] for r in rows}) > 8


def test_busy_cards_heat_idle_cards_do_not_and_cooldown_returns_to_idle():
    clk = FakeClock()
    active = [0, 2, 5, 6, 7, 9, 11, 12]
    with open_backend(sim_spec(), clock=clk) as b:
        idle0 = {r["card"]: r for r in b.sample()}
        for c in active:
            b.set_busy(c, True)
        clk.advance(60.0)  # 20 model time constants at time_scale 20
        hot = {r["card"]: r for r in b.sample()}
        for c in range(16):
            if c in active:
                assert 50.0 <= hot[c]["junction_c"] <= 53.0
                assert 115.0 <= c_to_f(hot[c]["junction_c"]) <= 130.0
                assert 1.0 <= hot[c]["junction_c"] - hot[c]["memory_c"] <= 6.0
                assert hot[c]["edge_c"] < hot[c]["memory_c"]
                assert 650.0 <= hot[c]["power_w"] <= 750.0
                assert hot[c]["util_pct"] >= 95.0
                assert hot[c]["mem_used_bytes"] > idle0[c]["mem_used_bytes"] + 10 * 1024**3
                assert hot[c]["sclk_mhz"] > 2000
            else:
                assert hot[c]["junction_c"] == idle0[c]["junction_c"]
                assert hot[c]["power_w"] == idle0[c]["power_w"]
                assert hot[c]["util_pct"] == 0.0
            # energy is the integral of power: 60 s at ≈ the final power
            assert hot[c]["energy_j"] == pytest.approx(60.0 * hot[c]["power_w"], rel=0.02)
        for c in active:
            b.set_busy(c, False)
        clk.advance(5.0)
        mid = {r["card"]: r for r in b.sample()}
        clk.advance(60.0)
        cool = {r["card"]: r for r in b.sample()}
    for c in active:
        assert idle0[c]["junction_c"] < mid[c]["junction_c"] < hot[c]["junction_c"]
        assert cool[c]["junction_c"] == pytest.approx(idle0[c]["junction_c"], abs=0.05)
        assert cool[c]["power_w"] == pytest.approx(idle0[c]["power_w"], abs=0.5)
        assert cool[c]["energy_j"] > hot[c]["energy_j"]


def test_simulated_state_carries_over_between_backends(tmp_path):
    """Separate cases (and Airflow tasks) of one run see one continuous box."""
    state = tmp_path / "sim-state.json"
    clk = FakeClock()
    with open_backend(sim_spec(), clock=clk, state_path=state) as b:
        idle = {r["card"]: r["junction_c"] for r in b.sample()}
        b.set_busy(12, True)
        clk.advance(60.0)
        hot = {r["card"]: r["junction_c"] for r in b.sample()}
    assert state.is_file()
    with open_backend(sim_spec(), clock=FakeClock(5.0), state_path=state) as b2:
        again = {r["card"]: r["junction_c"] for r in b2.sample()}
    # card 12 is still warm (it cooled only for the instant between the two backends), others idle
    assert again[12] > idle[12] + 10.0
    assert again[12] <= hot[12]
    assert again[3] == pytest.approx(idle[3], abs=0.01)
    # without a state file every backend starts idle
    with open_backend(sim_spec(), clock=FakeClock()) as b3:
        assert {r["card"]: r["junction_c"] for r in b3.sample()}[12] == pytest.approx(idle[12], abs=0.01)


def test_simulated_model_is_deterministic_and_independent_of_sampling_rate():
    def run(samples_per_step: int) -> list[dict]:
        clk = FakeClock()
        with open_backend(sim_spec(), clock=clk) as b:
            b.set_busy(4, True)
            for _ in range(10):
                for _ in range(samples_per_step):
                    b.sample()
                    clk.advance(1.0 / samples_per_step)
            b.set_busy(4, False)
            clk.advance(3.0)
            return [{k: v for k, v in r.items() if k != "t"} for r in b.sample()]

    a, b = run(1), run(10)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            if isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], abs=0.002), k
            else:
                assert x[k] == y[k], k


def test_time_scale_speeds_the_model_up():
    def junction_after(scale: float, seconds: float) -> float:
        clk = FakeClock()
        with open_backend(sim_spec(time_scale=scale), clock=clk) as b:
            b.set_busy(0, True)
            clk.advance(seconds)
            return b.sample()[0]["junction_c"]

    assert junction_after(20.0, 10.0) > 50.0  # a 10 s CPU smoke run heats visibly
    assert junction_after(1.0, 10.0) < 40.0   # real time constant ≈ 1 minute


def test_hot_card_broken_sensor_and_throttle_knobs():
    clk = FakeClock()
    with open_backend(sim_spec(hot_cards={3: 40.0}, broken_sensor_cards=[5], throttle_cards=[7]), clock=clk) as b:
        idle = {r["card"]: r for r in b.sample()}
        for c in (3, 4, 5, 7):
            b.set_busy(c, True)
        clk.advance(60.0)
        busy = {r["card"]: r for r in b.sample()}
        b.set_busy(7, False)
        clk.advance(60.0)
        after = {r["card"]: r for r in b.sample()}
    assert idle[3]["junction_c"] > 70.0
    assert busy[3]["junction_c"] > 90.0 > busy[4]["junction_c"]
    assert busy[3]["memory_c"] > busy[4]["memory_c"] + 30
    assert idle[5]["junction_c"] is None and busy[5]["junction_c"] is None
    assert busy[5]["memory_c"] is not None and busy[5]["power_w"] > 600
    assert idle[7]["throttle"] is False and busy[7]["throttle"] is True and after[7]["throttle"] is False
    assert busy[7]["throttle_reasons"] == "thermal"
    assert busy[7]["sclk_mhz"] < busy[4]["sclk_mhz"]
    assert busy[4]["throttle"] is False


# ---- amdsmi (recorded fake) ---------------------------------------------------------------------
class _FakeAmdSmiError(Exception):
    pass


def fake_amdsmi(path: Path = FIXTURES / "amdsmi_recorded.json", hive_override=None) -> types.ModuleType:
    data = json.loads(path.read_text())
    if hive_override is not None:
        for d in data["devices"]:
            d["xgmi_info"]["xgmi_hive_id"] = hive_override
    m = types.ModuleType("amdsmi")
    m.calls = {"init": 0, "shut_down": 0}

    class Handle:
        def __init__(self, i):
            self.i = i

    m.AmdSmiInitFlags = enum.IntEnum("AmdSmiInitFlags", {"INIT_AMD_GPUS": 2})
    m.AmdSmiTemperatureType = enum.IntEnum("AmdSmiTemperatureType", {"EDGE": 0, "HOTSPOT": 1, "JUNCTION": 1, "VRAM": 2})
    m.AmdSmiTemperatureMetric = enum.IntEnum("AmdSmiTemperatureMetric", {"CURRENT": 0, "MAX": 1})
    m.AmdSmiClkType = enum.IntEnum("AmdSmiClkType", {"SYS": 0, "GFX": 1, "DF": 2, "SOC": 3, "MEM": 4})
    m.AmdSmiLibraryException = _FakeAmdSmiError

    def replay(value):
        if isinstance(value, dict) and "raise" in value:
            raise _FakeAmdSmiError(value["raise"])
        return value

    def dev(h):
        return data["devices"][h.i]

    def init(flag=None):
        assert flag == m.AmdSmiInitFlags.INIT_AMD_GPUS
        m.calls["init"] += 1

    def shut_down():
        m.calls["shut_down"] += 1

    m.amdsmi_init = init
    m.amdsmi_shut_down = shut_down
    m.amdsmi_get_processor_handles = lambda: [Handle(i) for i in range(len(data["devices"]))]
    m.amdsmi_get_gpu_device_bdf = lambda h: replay(dev(h)["bdf"])
    m.amdsmi_get_gpu_device_uuid = lambda h: replay(dev(h)["uuid"])
    m.amdsmi_get_gpu_asic_info = lambda h: replay(dev(h)["asic_info"])
    m.amdsmi_get_gpu_board_info = lambda h: replay(dev(h)["board_info"])
    m.amdsmi_get_gpu_driver_info = lambda h: replay(dev(h)["driver_info"])
    m.amdsmi_get_xgmi_info = lambda h: replay(dev(h)["xgmi_info"])
    m.amdsmi_get_lib_version = lambda: data["lib_version"]

    def temp(h, sensor, metric):
        assert metric == m.AmdSmiTemperatureMetric.CURRENT
        return replay(dev(h)["temp_metric"][sensor.name])

    def clock(h, kind):
        return replay(dev(h)["clock_info"][kind.name])

    m.amdsmi_get_temp_metric = temp
    m.amdsmi_get_clock_info = clock
    m.amdsmi_get_power_info = lambda h: replay(dev(h)["power_info"])
    m.amdsmi_get_gpu_activity = lambda h: replay(dev(h)["gpu_activity"])
    m.amdsmi_get_gpu_vram_usage = lambda h: replay(dev(h)["vram_usage"])
    m.amdsmi_get_gpu_metrics_info = lambda h: replay(dev(h)["gpu_metrics_info"])
    m.amdsmi_get_energy_count = lambda h: replay(dev(h)["energy_count"])
    return m


def test_amdsmi_backend_replays_recorded_readings():
    lib = fake_amdsmi()
    with open_backend(TelemetrySpec(backend="amdsmi"), module=lib) as b:
        assert lib.calls == {"init": 1, "shut_down": 0}
        devs = b.devices()
        rows = b.sample()
        versions = b.versions()
    assert lib.calls == {"init": 1, "shut_down": 1}
    assert [d["bus_id"] for d in devs] == ["0000:0c:00.0", "0000:22:00.0", "0001:0c:00.0"]
    assert devs[0]["name"] == "AMD Instinct MI300X" and devs[0]["serial"] == "692324000101"
    assert devs[1]["serial"] == "0x5E9E6F2A1B2C3D02"       # board serial N/A → ASIC serial
    assert devs[2]["name"] is None and devs[2]["serial"] == "0x5E9E6F2A1B2C3D09"  # board info unsupported
    assert [d["domain"] for d in devs] == [0, 0, 1]       # from the XGMI hive ids
    assert devs[0]["vendor"] == "AMD" and devs[0]["uuid"].startswith("8cff74a1")

    r0, r1, r2 = rows
    assert r0["junction_c"] == 42.0 and r0["memory_c"] == 37.0
    assert r0["edge_c"] is None                             # sensor raises → None, never 0
    assert r0["power_w"] == 143.0 and r0["util_pct"] == 0.0
    assert r0["mem_used_bytes"] == 283 * 1024**2 and r0["mem_total_bytes"] == 196592 * 1024**2
    assert r0["mem_used_pct"] == pytest.approx(100 * 283 / 196592, abs=1e-3)
    assert r0["sclk_mhz"] == 132.0 and r0["mclk_mhz"] == 900.0
    assert r0["throttle"] is False and r0["throttle_reasons"] == ""
    assert r0["energy_j"] == pytest.approx(6553600000 * 15.259 / 1e6)

    assert r1["junction_c"] is None and r1["memory_c"] == 48.0
    assert r1["power_w"] == 612.0                           # older ROCm: average_socket_power
    assert r1["util_pct"] == 97.0 and r1["sclk_mhz"] == 2100.0  # older ROCm: cur_clk
    assert r1["throttle"] is True and "throttle_status" in r1["throttle_reasons"]
    assert r1["energy_j"] is None

    assert r2["power_w"] is None                            # every power key 'N/A'
    assert r2["util_pct"] is None and r2["sclk_mhz"] is None and r2["mclk_mhz"] is None
    assert r2["throttle"] is None and r2["throttle_reasons"] is None
    assert r2["junction_c"] == 51.0
    assert versions["driver_version"] == "6.12.12" and versions["library_version"] == "26.0.2"
    assert b.sensor_errors > 0


def test_amdsmi_domain_falls_back_to_profile_domains_without_hive_ids():
    lib = fake_amdsmi(hive_override=0)
    with open_backend(TelemetrySpec(backend="amdsmi"), domains=[[0], [1, 2]], module=lib) as b:
        assert [d["domain"] for d in b.devices()] == [0, 1, 1]
    with open_backend(TelemetrySpec(backend="amdsmi"), module=fake_amdsmi(hive_override=0)) as b:
        assert [d["domain"] for d in b.devices()] == [None, None, None]


def test_amdsmi_maps_cards_by_index_and_rejects_unknown_cards():
    with open_backend(TelemetrySpec(backend="amdsmi"), cards=[2], module=fake_amdsmi()) as b:
        (row,) = b.sample()
        assert row["card"] == 2 and row["junction_c"] == 51.0
    lib = fake_amdsmi()
    with pytest.raises(CardError, match=r"\[5\]"):
        with open_backend(TelemetrySpec(backend="amdsmi"), cards=[5], module=lib):
            pass
    assert lib.calls["shut_down"] == 1


def test_amdsmi_import_failure_is_a_telemetry_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def failing_import(name, *a, **k):
        if name == "amdsmi":
            raise KeyError("libamd_smi.so")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(TelemetryError, match=r"amdsmi backend unavailable: .*libamd_smi.so.*ROCm's libamd_smi not found"):
        with open_backend(TelemetrySpec(backend="amdsmi")):
            pass


def test_amdsmi_real_library_without_rocm_is_a_telemetry_error(capsys):
    if Path("/opt/rocm/lib/libamd_smi.so").exists():
        pytest.skip("ROCm present")
    with pytest.raises(TelemetryError, match="amdsmi backend unavailable"):
        with open_backend(TelemetrySpec(backend="amdsmi")):
            pass
    assert capsys.readouterr().out == ""  # the wheel's loader message stays out of stdout (JSON output)


def test_amdsmi_init_failure_is_a_telemetry_error():
    lib = fake_amdsmi()

    def boom(flag=None):
        raise _FakeAmdSmiError("AMDSMI_STATUS_DRIVER_NOT_LOADED")

    lib.amdsmi_init = boom
    with pytest.raises(TelemetryError, match="DRIVER_NOT_LOADED"):
        with open_backend(TelemetrySpec(backend="amdsmi"), module=lib):
            pass


# ---- NVML (recorded fake) -----------------------------------------------------------------------
class FakeNVMLError(Exception):
    def __init__(self, code):
        super().__init__(f"NVML error {code}")
        self.value = code


def fake_pynvml(path: Path = FIXTURES / "nvml_recorded.json") -> types.ModuleType:
    data = json.loads(path.read_text())
    m = types.ModuleType("pynvml")
    m.calls = {"init": 0, "shutdown": 0}
    m.NVMLError = FakeNVMLError
    m.NVML_SUCCESS = 0
    m.NVML_TEMPERATURE_GPU = 0
    m.NVML_CLOCK_SM = 1
    m.NVML_CLOCK_MEM = 2
    m.NVML_FI_DEV_MEMORY_TEMP = 82

    def replay(v):
        if isinstance(v, dict) and "raise" in v:
            raise FakeNVMLError(v["raise"])
        return v

    def dev(h):
        return data["devices"][h]

    def init():
        m.calls["init"] += 1

    def shutdown():
        m.calls["shutdown"] += 1

    def field_values(h, ids):
        assert ids == [82]
        f = dev(h)["memory_temp_field"]
        value = types.SimpleNamespace(dVal=float(f["value"]), uiVal=f["value"], ulVal=f["value"], ullVal=f["value"],
                                      sllVal=f["value"], siVal=f["value"], usVal=f["value"])
        return [types.SimpleNamespace(fieldId=82, nvmlReturn=f["nvmlReturn"], valueType=f["valueType"], value=value)]

    def temperature(h, sensor):
        assert sensor == 0
        return replay(dev(h)["temperature_gpu"])

    def clock(h, kind):
        return replay(dev(h)["clock_sm" if kind == 1 else "clock_mem"])

    m.nvmlInit = init
    m.nvmlShutdown = shutdown
    m.nvmlDeviceGetCount = lambda: len(data["devices"])
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = lambda h: replay(dev(h)["name"])
    m.nvmlDeviceGetSerial = lambda h: replay(dev(h)["serial"])
    m.nvmlDeviceGetUUID = lambda h: replay(dev(h)["uuid"])
    m.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=dev(h)["pci_bus_id"].encode())
    m.nvmlDeviceGetTemperature = temperature
    m.nvmlDeviceGetFieldValues = field_values
    m.nvmlDeviceGetPowerUsage = lambda h: replay(dev(h)["power_usage_mw"])
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(**dev(h)["utilization"])
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(**dev(h)["memory"])
    m.nvmlDeviceGetClockInfo = clock
    m.nvmlDeviceGetCurrentClocksEventReasons = lambda h: replay(dev(h)["clocks_event_reasons"])
    m.nvmlDeviceGetTotalEnergyConsumption = lambda h: replay(dev(h)["total_energy_mj"])
    m.nvmlSystemGetDriverVersion = lambda: data["driver_version"]
    m.nvmlDeviceGetCurrPcieLinkGeneration = lambda h: 5  # host link and power limit (not in the recording)
    m.nvmlDeviceGetCurrPcieLinkWidth = lambda h: 16
    m.nvmlDeviceGetMaxPcieLinkWidth = lambda h: 16
    m.nvmlDeviceGetEnforcedPowerLimit = lambda h: 700000  # mW
    m.nvmlSystemGetCudaDriverVersion = lambda: data["cuda_driver_version"]
    m.nvmlSystemGetNVMLVersion = lambda: data["nvml_version"]
    return m


def test_nvml_backend_replays_recorded_readings():
    lib = fake_pynvml()
    with open_backend(TelemetrySpec(backend="nvml"), module=lib) as b:
        devs = b.devices()
        r0, r1 = b.sample()
        versions = b.versions()
    assert lib.calls == {"init": 1, "shutdown": 1}
    assert devs[0] == {"index": 0, "name": "NVIDIA H100 80GB HBM3", "vendor": "NVIDIA", "serial": "1654923012345",
                       "bus_id": "00000000:19:00.0", "domain": None,
                       "uuid": "GPU-3f1c2a4b-5d6e-7f80-91a2-b3c4d5e6f708", "link_gen": 5, "link_width": 16,
                       "link_width_max": 16, "power_limit_w": 700.0}
    assert devs[1]["serial"] is None  # not supported → None
    assert r0["junction_c"] == 29.0 and r0["memory_c"] == 27.0 and r0["edge_c"] is None
    assert r0["power_w"] == pytest.approx(69.412)
    assert r0["energy_j"] == pytest.approx(123456.789)
    assert r0["mem_used_bytes"] == 562036736 and r0["mem_total_bytes"] == 85520809984
    assert r0["util_pct"] == 0.0 and r0["sclk_mhz"] == 345.0 and r0["mclk_mhz"] == 2619.0
    assert r0["throttle"] is False and r0["throttle_reasons"] == "gpu_idle"   # idle is not a slowdown
    assert r1["memory_c"] is None            # field not supported
    assert r1["power_w"] is None             # call raised → None, never 0
    assert r1["throttle"] is True and r1["throttle_reasons"] == "sw_power_cap|hw_thermal_slowdown"
    from mi300x_cert.telemetry.nvml_backend import clock_event_reasons
    assert clock_event_reasons(0x4) == (False, "sw_power_cap")   # at the power limit: not a thermal event
    assert clock_event_reasons(0x20)[0] is True and clock_event_reasons(0x8)[0] is True
    assert r1["util_pct"] == 100.0 and r1["junction_c"] == 55.0
    assert versions["driver_version"] == "580.159.04" and versions["cuda_driver_version"] == "13.0"


def test_nvml_reads_the_costly_energy_counter_at_most_once_a_second():
    """On an H100 the energy counter costs ≈4 ms of CPU a read, everything else ≈80 µs together."""
    lib = fake_pynvml()
    reads = []
    lib.nvmlDeviceGetTotalEnergyConsumption = lambda h: reads.append(h) or 1000.0 * (len(reads))
    clk = FakeClock()
    with open_backend(TelemetrySpec(backend="nvml"), cards=[0], module=lib, clock=clk) as b:
        first = b.sample()[0]["energy_j"]
        for _ in range(9):          # 0.9 s at 10 Hz: the counter is not read again
            clk.advance(0.1)
            assert b.sample()[0]["energy_j"] == first
        clk.advance(0.15)           # past the interval: read again
        later = b.sample()[0]["energy_j"]
    assert len(reads) == 2 and later > first


def test_nvml_init_failure_is_a_telemetry_error():
    lib = fake_pynvml()

    def boom():
        raise FakeNVMLError("NVML Shared Library Not Found")

    lib.nvmlInit = boom
    with pytest.raises(TelemetryError, match="nvml backend unavailable.*Shared Library Not Found"):
        with open_backend(TelemetrySpec(backend="nvml"), module=lib):
            pass


def test_nvml_real_library_without_driver_is_a_telemetry_error():
    import ctypes.util

    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("an NVIDIA driver is present")
    with pytest.raises(TelemetryError, match="nvml backend unavailable"):
        with open_backend(TelemetrySpec(backend="nvml")):
            pass


# ---- sampler ------------------------------------------------------------------------------------
def test_sampler_writes_phased_samples_and_refcounts_busy_cards(tmp_path):
    tel = CsvStream(tmp_path / "telemetry.csv", TELEMETRY_COLUMNS)
    ev = CsvStream(tmp_path / "events.csv", EVENT_COLUMNS)
    with open_backend(sim_spec(), host_cards=list(range(4))) as b:
        calls = []
        orig = b.set_busy
        b.set_busy = lambda c, busy: (calls.append((c, busy)), orig(c, busy))
        s = Sampler(b, tel, ev, rate_hz=40)
        s.start()
        s.phase("idle", cards=[0, 1, 2, 3])
        time.sleep(0.15)
        s.phase("active", cards=[1])
        s.batch("start", card=1, proc=0, case_id="c1", batch_index=0, batch_size=4)
        s.batch("start", card=1, proc=1, case_id="c1", batch_index=0, batch_size=4)  # second process, same card
        s.batch("end", card=1, proc=0, case_id="c1", batch_index=0, batch_size=4)
        assert s.busy_cards() == {1: 1}
        time.sleep(0.15)
        s.batch("end", card=1, proc=1, case_id="c1", batch_index=0, batch_size=4)
        s.phase("cooldown", cards=[1])
        time.sleep(0.1)
        s.stop()
    tel.close(), ev.close()
    assert calls == [(1, True), (1, False)]
    assert s.busy_cards() == {}
    rows = read_csv(tmp_path / "telemetry.csv")
    assert list(rows[0]) == TELEMETRY_COLUMNS
    assert len(rows) % 4 == 0 and len(rows) >= 4 * 5
    phases = [r["phase"] for r in rows]
    assert {"idle", "active", "cooldown"} <= set(phases)
    assert phases.index("cooldown") > phases.index("active") > phases.index("idle")
    util_active = [float(r["util_pct"]) for r in rows if r["phase"] == "active" and r["card"] == "1"]
    assert max(util_active) >= 95.0
    assert all(float(r["util_pct"]) == 0.0 for r in rows if r["card"] == "0")
    events = read_csv(tmp_path / "events.csv")
    assert list(events[0]) == EVENT_COLUMNS
    assert [e["kind"] for e in events] == ["phase", "phase", "batch_start", "batch_start", "batch_end", "batch_end",
                                           "phase"]
    assert events[0]["cards"] == "[0,1,2,3]"
    assert events[2]["card"] == "1" and events[2]["case_id"] == "c1" and events[2]["batch_size"] == "4"
    assert events[3]["proc"] == "1" and events[2]["phase"] == "active"
    ts = [float(e["t"]) for e in events]
    assert ts == sorted(ts) and abs(ts[0] - time.time()) < 60


class FlakyBackend(TelemetryBackend):
    """Fails every other sample."""

    name = "flaky"

    def __init__(self):
        super().__init__(cards=None)
        self.n = 0

    def _open_impl(self):
        return [0, 1]

    def _device(self, card):
        return {"name": "x"}

    def _sample_card(self, card, t):
        return {"t": t, "card": card, "junction_c": 40.0, "power_w": 100.0}

    def sample(self):
        self.n += 1
        if self.n % 2 == 0:
            raise RuntimeError("sensor bus hiccup")
        return super().sample()


def test_sampler_survives_sampling_errors_and_counts_them(tmp_path):
    tel = CsvStream(tmp_path / "telemetry.csv", TELEMETRY_COLUMNS)
    ev = CsvStream(tmp_path / "events.csv", EVENT_COLUMNS)
    with FlakyBackend() as b:
        s = Sampler(b, tel, ev, rate_hz=50).start()
        time.sleep(0.3)
        s.stop()
    tel.close(), ev.close()
    assert s.errors >= 3 and "sensor bus hiccup" in s.last_error
    rows = read_csv(tmp_path / "telemetry.csv")
    bad = [r for r in rows if r["junction_c"] == ""]
    good = [r for r in rows if r["junction_c"] == "40.0"]
    assert len(bad) == 2 * s.errors and good
    assert all(r[c] == "" for r in bad for c in ("power_w", "util_pct", "memory_c", "throttle"))
    assert len(rows) == 2 * s.samples


def test_sampler_is_light_on_cpu(tmp_path):
    tel = CsvStream(tmp_path / "telemetry.csv", TELEMETRY_COLUMNS)
    ev = CsvStream(tmp_path / "events.csv", EVENT_COLUMNS)
    with open_backend(sim_spec()) as b:
        s = Sampler(b, tel, ev, rate_hz=10).start()
        time.sleep(2.0)
        s.stop()
    tel.close(), ev.close()
    assert 8 <= s.samples <= 25
    # a generous bound (the target is < 5 % of one core at 10 Hz for 16 cards)
    assert s.cpu_time_s / s.wall_time_s < 0.15, (s.cpu_time_s, s.wall_time_s)


def test_sampler_batch_markers_are_thread_safe(tmp_path):
    ev = CsvStream(tmp_path / "events.csv", EVENT_COLUMNS)
    tel = CsvStream(tmp_path / "telemetry.csv", TELEMETRY_COLUMNS)
    with open_backend(sim_spec(), clock=FakeClock()) as b:
        s = Sampler(b, tel, ev, rate_hz=100).start()

        def worker(proc):
            for i in range(50):
                s.batch("start", card=proc % 4, proc=proc, batch_index=i)
                s.batch("end", card=proc % 4, proc=proc, batch_index=i)

        threads = [threading.Thread(target=worker, args=(p,)) for p in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        s.stop()
        assert s.busy_cards() == {}
        assert all(r["util_pct"] == 0.0 for r in b.sample())
    ev.close(), tel.close()
    assert len(read_csv(tmp_path / "events.csv")) == 8 * 50 * 2


def test_sampler_rejects_bad_markers():
    with open_backend(sim_spec()) as b:
        s = Sampler(b, types.SimpleNamespace(write=lambda r: None), types.SimpleNamespace(write=lambda r: None), 5)
        with pytest.raises(ValueError, match="middle"):
            s.batch("middle", card=0)
        with pytest.raises(ValueError):
            Sampler(b, None, None, rate_hz=0)
