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
    # every named set says which hosts have it (a Param cannot depend on the chosen host)
    assert schema["card_set"]["values_display"]["[4-7]"] == "Cards [4-7] (4 cards) on mi300x-01"
    assert schema["card_set"]["values_display"]["[0-3]"] == "Cards [0-3] (4 cards) on smoke-host, mi300x-01"
    assert schema["card_set"]["values_display"]["[0]"] == "Cards [0] (1 card) on h100-01"
    assert "h100-01` [0]" in schema["custom_cards"]["description_md"]
    assert schema["host"]["values_display"]["h100-01"] == "h100-01 (h100, 1 card)"
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
    ({"card_set": "custom", "custom_cards": "[6-12]"}, "custom_cards"),   # card 12 not on an 8-card host
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


def test_custom_card_list_schema_error_is_readable(dags):
    """The schema's error quotes its pattern: a character class, not a regex of the whole syntax."""
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError) as e:
        _validate(dags["manual_certify"], {"custom_cards": "zero, one"})
    msg = str(e.value).splitlines()[0]
    assert msg == "Invalid input for param custom_cards: 'zero, one' does not match '^[0-9 ,\\\\[\\\\]-]*$'", msg


@pytest.fixture
def two_hosts(tmp_path):
    """An 8-card host and a 1-card host with their own card sets."""
    from mi300x_cert.fleet import load_fleet

    eight = tmp_path / "eight.yaml"
    eight.write_text("name: eight\nsku: smoke\nhost: {cards: 8}\ndevice: cpu\n"
                     "experiments:\n  bare-metal: {groups: ['[0-3]']}\n  sd-throughput: {cards: '[0-3]'}\n")
    one = tmp_path / "one.yaml"
    one.write_text("name: one\nsku: smoke\nhost: {cards: 1}\ndevice: cpu\n"
                   "experiments:\n  bare-metal: {groups: ['[0]']}\n  sd-throughput: {cards: '[0]', process_counts: [1]}\n")
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(f"servers:\n  - {{name: eight-host, profile: {eight}, sku: smoke, cards: 8, "
                     "card_groups: {'[0-3]': '0-3', '[4-7]': '4-7'}}\n"
                     f"  - {{name: one-host, profile: {one}, sku: smoke, cards: 1, card_groups: {{'[0]': [0]}}}}\n")
    return load_fleet(fleet)


def test_card_set_labels_name_their_hosts(two_hosts):
    from mi300x_cert.airflow_dags import manual_params

    p = manual_params("certify", two_hosts)
    shown = p["card_set"].schema["values_display"]
    assert shown["[4-7]"] == "Cards [4-7] (4 cards) on eight-host"
    assert shown["[0]"] == "Cards [0] (1 card) on one-host"
    assert "`eight-host` [0-7]; `one-host` [0]" in p["custom_cards"].schema["description_md"]


@pytest.mark.parametrize("conf, message", [
    ({"card_set": "[4-7]"},
     "field 'card_set': host one-host has no card set '[4-7]' (its cards: [0]; its card sets: [0]; or choose 'all' or 'custom')"),
    ({"card_set": "custom", "custom_cards": "[0-3]"},
     "field 'custom_cards': host one-host has no card(s) [1, 2, 3]; its cards are [0]"),
    ({"card_set": "custom", "custom_cards": "5-"},
     "field 'custom_cards': card set '5-': '5-' is neither a card id, a range nor a group name "
     "(write card ids and ranges, e.g. [0,2,5-7] or 12-15)"),
])
def test_card_set_the_host_lacks_is_refused_naming_its_cards(two_hosts, conf, message):
    """Refused by check_conf, before the run is handed to the host: one message naming the host and its cards."""
    from mi300x_cert.airflow_dags import check_request
    from mi300x_cert.errors import ProfileError

    with pytest.raises(ProfileError) as e:
        check_request("certify", {"host": "one-host", **conf}, two_hosts)
    assert str(e.value) == message
    # the same sets are fine on the host that has them
    ok = check_request("certify", {"host": "eight-host", "card_set": "[4-7]"}, two_hosts)
    assert ok["overrides"]["experiments"]["sd-throughput"]["cards"] == [4, 5, 6, 7]
    ok = check_request("certify", {"host": "one-host", "card_set": "[0]"}, two_hosts)
    assert ok["overrides"]["experiments"]["bare-metal"]["groups"] == [[0]]


def test_check_conf_task_refuses_a_card_set_of_another_host(two_hosts):
    """The manual DAG's first task fails (no retry) with the readable message: the run never starts."""
    from airflow.sdk.exceptions import AirflowFailException

    from mi300x_cert.airflow_dags import build_manual_dag

    dag = build_manual_dag("certify", two_hosts)
    task = dag.get_task("check_conf")
    assert task.retries == 0
    from unittest import mock

    with mock.patch("mi300x_cert.airflow_dags.get_current_context",
                    return_value={"params": {"host": "one-host", "card_set": "[0-3]"}, "run_id": "r",
                                  "dag": dag}):
        with pytest.raises(AirflowFailException, match=r"bad trigger form: field 'card_set': host one-host has no "
                                                        r"card set '\[0-3\]' \(its cards: \[0\]"):
            task.python_callable()


@pytest.mark.parametrize("paused", [True, False])
def test_check_conf_fails_fast_when_the_host_dag_is_paused(two_hosts, paused):
    """A paused recertify_<host> would leave the manual run 'running' for ever: check_conf fails at
    once with the message (no retry, nothing triggered); an active host DAG passes."""
    import time
    from types import SimpleNamespace
    from unittest import mock

    from airflow.sdk.exceptions import AirflowFailException

    from mi300x_cert.airflow_dags import build_manual_dag

    dag = build_manual_dag("certify", two_hosts)
    task = dag.get_task("check_conf")
    asked = []

    class _TI:
        def get_dag(self, dag_id):
            asked.append(dag_id)
            return SimpleNamespace(dag_id=dag_id, is_paused=paused)

    ctx = {"params": {"host": "one-host", "card_set": "[0]"}, "run_id": "r", "dag": dag, "ti": _TI()}
    t0 = time.monotonic()
    with mock.patch("mi300x_cert.airflow_dags.get_current_context", return_value=ctx):
        if paused:
            with pytest.raises(AirflowFailException, match=r"host DAG recertify_one-host is paused, so the run would "
                                                            r"never start\. Unpause it .*airflow dags unpause recertify_one-host"):
                task.python_callable()
        else:
            assert task.python_callable()["experiments"]
    assert asked == ["recertify_one-host"] and time.monotonic() - t0 < 5


def test_check_conf_names_a_host_dag_that_cannot_be_found(two_hosts):
    from unittest import mock

    from airflow.sdk.exceptions import AirflowFailException

    from mi300x_cert.airflow_dags import build_manual_dag

    dag = build_manual_dag("certify", two_hosts)

    class _TI:
        def get_dag(self, dag_id):
            raise LookupError(f"DAG {dag_id} not found")

    ctx = {"params": {"host": "one-host", "card_set": "[0]"}, "run_id": "r", "dag": dag, "ti": _TI()}
    with mock.patch("mi300x_cert.airflow_dags.get_current_context", return_value=ctx):
        with pytest.raises(AirflowFailException, match="host DAG recertify_one-host cannot be found"):
            dag.get_task("check_conf").python_callable()


def test_register_requires_the_experiments_the_trigger_chose():
    """The control plane's register task limits the fleet profile's required suites to the experiments
    the conf chose (an override may disable one more); an unusable conf requires everything."""
    from mi300x_cert.airflow_dags import _chosen_experiments
    from mi300x_cert.experiments import EXPERIMENTS

    assert _chosen_experiments({}) == list(EXPERIMENTS)
    assert _chosen_experiments({"experiments": ["sd-throughput", "bare-metal"]}) == ["bare-metal", "sd-throughput"]
    assert _chosen_experiments({"experiments": ["bare-metal", "sd-throughput"],
                                "overrides": {"experiments": {"bare-metal": {"enabled": False}}}}) == ["sd-throughput"]
    assert _chosen_experiments({"experiments": ["no-such-experiment"]}) is None
    assert _chosen_experiments(None) is None
