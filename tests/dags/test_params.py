"""Trigger forms: bad conf is refused naming the field, good conf becomes profile overrides."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dags():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag.dags


def _validate(dag, conf: dict) -> dict:
    params = copy.deepcopy(dag.params)
    for k, v in conf.items():
        params[k] = v  # validates on set
    return params.validate()


@pytest.mark.parametrize("conf, field", [
    ({"host": "no-such-host"}, "host"),
    ({"card_set": "[99]"}, "card_set"),
    ({"custom_cards": "zero, one"}, "custom_cards"),
    ({"batch_configs": ["8by64"]}, "batch_configs"),
    ({"process_counts": [3]}, "process_counts"),
    ({"repetitions": 0}, "repetitions"),
    ({"dtype": "float8"}, "dtype"),
    ({"thresholds": "a100"}, "thresholds"),
    ({"model_source": "https://huggingface.co/x"}, "model_source"),
])
def test_schema_rejects_bad_values_naming_the_field(dags, conf, field):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=f"param {field}"):
        _validate(dags["manual_certify"], conf)


def test_form_fields_render_as_typed_widgets(dags):
    p = dags["manual_sd_throughput"].params
    schema = {k: p.get_param(k).schema for k in p}
    assert schema["host"]["enum"][0] == "smoke-host"
    assert "[12-15]" in schema["card_set"]["enum"] and "custom" in schema["card_set"]["enum"]
    assert schema["card_set"]["values_display"]["[0,2,5,6,7,9,11,12]"].startswith("Cards")
    assert "array" in schema["batch_configs"]["type"] and "128x4" in schema["batch_configs"]["examples"]
    assert schema["process_counts"]["examples"] == [1, 2, 4, 8, 16]
    assert schema["repetitions"]["minimum"] == 1
    assert set(schema["thresholds"]["enum"]) >= {"smoke", "mi300x", "h100"}
    # per-experiment forms only show their fields
    assert "batch_configs" not in dags["manual_whisper"].params
    assert "repetitions" not in dags["manual_bare_metal"].params
    # good values pass, strings from the UI multi-select included
    ok = _validate(dags["manual_certify"], {"card_set": "[0-3]", "batch_configs": ["1x512", "2x2"],
                                            "process_counts": ["1", 2], "repetitions": 2,
                                            "model_source": "synthetic:sd-tiny"})
    assert ok["card_set"] == "[0-3]"


@pytest.fixture
def small_fleet(tmp_path):
    from mi300x_cert.fleet import load_fleet

    prof = tmp_path / "eight.yaml"
    prof.write_text("name: eight\nsku: smoke\nhost: {cards: 8}\ndevice: cpu\n"
                    "experiments:\n  bare-metal: {groups: ['[0-3]']}\n  sd-throughput: {cards: '[0-3]'}\n")
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(f"servers:\n  - name: eight-host\n    profile: {prof}\n    sku: smoke\n    cards: 8\n"
                     "    card_groups: {'[0-3]': '0-3', '[4-7]': '4-7'}\n")
    return load_fleet(fleet)


def test_conf_becomes_overrides(small_fleet):
    from mi300x_cert.airflow_dags import check_request

    req = check_request("sd_throughput", {"host": "eight-host", "card_set": "[4-7]", "batch_configs": ["1x2", "2x1"],
                                          "process_counts": ["1", 2], "repetitions": 3, "dtype": "float32",
                                          "model_source": "synthetic:sd-tiny", "thresholds": "smoke"}, small_fleet)
    ov = req["overrides"]
    assert req["experiments"] == ["sd-throughput"]
    sd = ov["experiments"]["sd-throughput"]
    assert sd["cards"] == [4, 5, 6, 7] and sd["batch_configs"] == ["1x2", "2x1"]
    assert sd["process_counts"] == [1, 2] and sd["repetitions"] == 3 and sd["enabled"] is True
    assert ov["experiments"]["bare-metal"]["enabled"] is False
    assert ov["dtype"] == "float32" and ov["sd"] == {"model": "synthetic:sd-tiny"} and ov["thresholds"] == "smoke"
    req = check_request("bare_metal", {"host": "eight-host", "card_set": "custom", "custom_cards": "[0,2,5-6]"}, small_fleet)
    assert req["overrides"]["experiments"]["bare-metal"]["groups"] == [[0, 2, 5, 6]]


@pytest.mark.parametrize("conf, field", [
    ({"card_set": "custom", "custom_cards": "[6-12]"}, "card_set"),       # card 12 not on an 8-card host
    ({"card_set": "custom", "custom_cards": ""}, "custom_cards"),
    ({"model_source": "synthetic:no-such-arch"}, "model_source"),
    ({"model_source": "/nonexistent/weights"}, "model_source"),
    ({"batch_configs": ["0x4"]}, "batch_configs"),
])
def test_cross_validation_names_the_field(small_fleet, conf, field):
    from mi300x_cert.airflow_dags import check_request
    from mi300x_cert.errors import ProfileError

    with pytest.raises(ProfileError, match=f"field '{field}'"):
        check_request("certify", {"host": "eight-host", **conf}, small_fleet)
