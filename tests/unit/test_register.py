"""The one decision (outcome.decide) and the one conclusion (register.conclude): trust, refusals,
replays, idempotence, and certifications that produced no bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mi300x_cert.bundle import build_bundle
from mi300x_cert.outcome import decide
from mi300x_cert.register import conclude, location_of

SUITES_OK = {"latency": {"suite": "latency", "success": True, "failures": []},
             "thermal": {"suite": "thermal", "success": True, "failures": []}}


# ---- decide -------------------------------------------------------------------------------------

def test_decide_certifies_only_when_every_condition_holds():
    ok = decide(state="complete", verdicts={"success": True, "suites": SUITES_OK}, signed=True, trusted=True)
    assert ok.certified and ok.result == "CERTIFIED" and ok.reasons == [] and ok.passed_suites == ["latency", "thermal"]

    cases = {
        "measurements failed": dict(state="failed", error="case c3 crashed", verdicts={"suites": SUITES_OK}),
        "failed suites: thermal": dict(state="complete", verdicts={"suites": {
            **SUITES_OK, "thermal": {"success": False, "failures": [{"card": 3}]}}}),
        "suites not evaluated: network": dict(state="complete", verdicts={"suites": SUITES_OK, "not_validated": ["network"]}),
        "no verdicts": dict(state="complete", verdicts=None),
        "no suite was evaluated": dict(state="complete", verdicts={"suites": {
            "whisper": {"status": "skipped", "success": None}}}),
        "no signed bundle": dict(state="complete", verdicts={"suites": SUITES_OK}, signed=False),
        "signer not trusted: key abc is revoked": dict(state="complete", verdicts={"suites": SUITES_OK}, trusted=False,
                                                        trust_reason="key abc is revoked"),
        "the overall verdict is FAIL": dict(state="complete", verdicts={"success": False, "suites": SUITES_OK}),
        # a verdict that is neither true nor false fails closed
        "failed suites: latency": dict(state="complete", verdicts={"suites": {**SUITES_OK, "latency": {"success": None}}}),
        # the DAG's XComs: a suite that never reported is missing
        "suites not evaluated: thermal": dict(state="complete", verdicts={"latency": SUITES_OK["latency"], "thermal": None}),
    }
    for reason, kw in cases.items():
        d = decide(**kw)
        assert not d.certified and d.result == "NOT CERTIFIED", (reason, d)
        assert any(reason in r for r in d.reasons), (reason, d.reasons)
    # a required suite that says skipped is missing
    d = decide(state="complete", verdicts={"suites": {**SUITES_OK, "network": {"status": "skipped"}}}, required=["network"])
    assert d.missing_suites == ["network"] and not d.certified


def test_location_of_names_host_date_and_run():
    assert location_of("s3://b/certifications/h1/2026-11-29/run-7") == ("h1", "2026-11-29", "run-7")
    assert location_of("s3://b/certifications/h1/2026-11-29/run-7/") == ("h1", "2026-11-29", "run-7")
    assert location_of("s3://b/x") == (None, None, None)


# ---- conclude on local bundle directories ----------------------------------------------------

@pytest.fixture
def reg():
    from mi300x_cert.registry import open_registry

    return open_registry()


@pytest.fixture
def enrolled(reg):
    """The development key (what signs in these tests) enrolled for the fixture runs' host."""
    from mi300x_cert.bundle.keys import load_signer

    def enroll(host: str = "gpu-node-07"):
        return reg.enroll_key(host, load_signer().public_pem, by="test")

    return enroll


def test_unenrolled_signer_is_refused_and_recorded(make_complete_run, reg):
    bundle = build_bundle(make_complete_run().root)
    out = conclude(bundle=bundle)
    assert out["refused"] and not out["certified"]
    assert any("not enrolled for host gpu-node-07" in r for r in out["reasons"]), out["reasons"]
    rec = reg.get_certification("gpu-node-07", out["run_id"])
    assert rec["result"] == "NOT CERTIFIED" and rec["trusted"] is False and rec["cards"] == []
    (alert,) = reg.list_alerts()
    assert alert["kind"] == "refused" and "not enrolled" in alert["message"]


def test_enrolled_signer_certifies_once_then_nothing_changes(make_complete_run, reg, enrolled):
    enrolled()
    # the daily audit found the host never certified; the certificate settles that alert
    reg.audit_expiry([{"name": "gpu-node-07", "valid_days": 30}])
    assert [a["kind"] for a in reg.list_alerts()] == ["never_certified"]
    rd = make_complete_run()
    bundle = build_bundle(rd.root)
    out = conclude(bundle=bundle, source="certify")
    assert out["certified"] and out["created"] and out["reasons"] == [] and out["alerts"] == []
    settled = reg.list_alerts(include_acknowledged=True)
    assert [(a["kind"], a["status"], a["acknowledged_by"]) for a in settled] == [("never_certified", "acknowledged", "mi300x-cert")]
    rec = reg.get_certification("gpu-node-07", rd.run_id)
    assert rec["result"] == "CERTIFIED" and rec["source"] == "certify" and rec["signer_keyid"]
    assert sorted(c["serial"] for c in rec["cards"]) == ["SN-0", "SN-1"]
    assert [r["run_id"] for r in reg.serial_history("SN-0")] == [rd.run_id]
    again = conclude(bundle=bundle)
    assert again["certified"] and again["created"] is False
    assert [a["kind"] for a in reg.list_alerts()] == []
    assert len(reg.list_certifications()) == 1
    # a different bundle for the same run (re-signed: a new envelope) is a conflict; the record stays
    other = build_bundle(rd.root)
    conflict = conclude(bundle=other)
    assert conflict["refused"] and not conflict["certified"]
    assert reg.get_certification("gpu-node-07", rd.run_id)["bundle_digest"] == rec["bundle_digest"]
    assert [a["kind"] for a in reg.list_alerts()] == ["conflict"]


def test_failed_suite_raises_one_alert_per_suite(make_complete_run, reg, enrolled):
    enrolled()
    rd = make_complete_run(success=False)
    out = conclude(bundle=build_bundle(rd.root))
    assert not out["certified"] and not out["refused"] and out["reasons"] == ["failed suites: thermal"]
    (alert,) = reg.list_alerts()
    assert alert["suite"] == "thermal" and alert["kind"] == "expectation" and alert["failures"]
    rec = reg.get_certification("gpu-node-07", rd.run_id)
    assert rec["verdicts"] == {"latency": True, "thermal": False}
    assert [f["suite"] for f in rec["failed"]] == ["thermal"]


def test_revoked_key_and_wrong_host_are_refused(make_complete_run, reg, enrolled):
    key = enrolled()
    b1 = build_bundle(make_complete_run().root)
    out = conclude(bundle=b1, host="another-host")
    assert out["refused"] and any("names host 'gpu-node-07', not 'another-host'" in r for r in out["reasons"])
    reg.revoke_key(key["keyid"], by="test", reason="host reinstalled")
    b2 = build_bundle(make_complete_run().root)
    out = conclude(bundle=b2)
    assert out["refused"] and any("revoked" in r for r in out["reasons"]), out["reasons"]


def test_tampered_bundle_is_refused_with_the_file_named(make_complete_run, reg, enrolled, tmp_path):
    enrolled()
    rd = make_complete_run(success=False)
    bundle = build_bundle(rd.root)
    forged = tmp_path / "forged"
    shutil.copytree(bundle, forged)
    v = forged / "artifacts" / "validation" / "verdicts.json"
    doc = json.loads(v.read_text())
    doc["suites"]["thermal"].update(success=True, failures=[])
    v.write_text(json.dumps(doc))
    out = conclude(bundle=forged, host="gpu-node-07", run_id=rd.run_id)
    assert out["refused"] and not out["certified"]
    assert any("artifacts/validation/verdicts.json does not match its signed digest" in r for r in out["reasons"])
    assert reg.get_certification("gpu-node-07", rd.run_id)["result"] == "NOT CERTIFIED"


def test_a_run_without_a_bundle_is_not_certified(reg):
    out = conclude(host="h9", run_id="r1", state="failed", error="case c2: worker crashed",
                   verdicts={"latency": {"suite": "latency", "success": True}, "thermal": None})
    assert not out["certified"]
    assert any("measurements failed: case c2" in r for r in out["reasons"])
    assert any("no signed bundle" in r for r in out["reasons"])
    (alert,) = reg.list_alerts(host="h9")
    assert alert["kind"] == "not_certified" and "no signed bundle" in alert["message"]
    with pytest.raises(Exception, match="host and run id"):
        conclude(state="complete", verdicts={})


# ---- S3: replays --------------------------------------------------------------------------------

def test_replayed_bundle_in_s3_is_refused(make_complete_run, reg, enrolled, s3_store, tmp_path, capsys):
    import base64
    import hashlib

    from mi300x_cert import cli
    from mi300x_cert.bundle import verify_bundle
    from mi300x_cert.errors import VerifyError
    from mi300x_cert.storage import load_store_config, make_client, publish_bundle

    enrolled()
    rd = make_complete_run()
    bundle = build_bundle(rd.root)
    uri = publish_bundle(bundle, s3_store)
    assert conclude(bundle=uri, store=s3_store)["certified"]
    host, day, run = location_of(uri)
    replay = uri.rsplit("/", 1)[0] + "/another-run"
    client = make_client(load_store_config(s3_store))
    prefix = replay.split("/", 3)[3]
    for f in sorted(p for p in bundle.rglob("*") if p.is_file()):
        data = f.read_bytes()
        client.put_object(Bucket=s3_store["bucket"], Key=f"{prefix}/{f.relative_to(bundle).as_posix()}", Body=data,
                          ChecksumAlgorithm="SHA256", Metadata={"sha256": hashlib.sha256(data).hexdigest()},
                          ChecksumSHA256=base64.b64encode(hashlib.sha256(data).digest()).decode())
    with pytest.raises(VerifyError, match="replay"):
        verify_bundle(replay, store=s3_store)
    out = conclude(bundle=replay, store=s3_store)
    assert out["refused"] and out["run_id"] == "another-run" and any("replay" in r for r in out["reasons"])
    assert reg.get_certification(host, "another-run")["result"] == "NOT CERTIFIED"
    assert reg.get_certification(host, run)["result"] == "CERTIFIED"  # the original record is untouched
    # the CLI says so too (exit 2: not an authentic bundle at that place)
    for k, v in {"MI300X_CERT_S3_ENDPOINT": s3_store["endpoint"], "AWS_ACCESS_KEY_ID": s3_store["access_key"],
                 "AWS_SECRET_ACCESS_KEY": s3_store["secret_key"]}.items():
        import os

        os.environ[k] = v
    try:
        assert cli.main(["verify", replay]) == 2
        assert "refused as a replay" in capsys.readouterr().err
        assert cli.main(["verify", uri]) == 0
    finally:
        for k in ("MI300X_CERT_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.pop(k, None)


# ---- the fleet profile's required suites (defense in depth on the control plane) ----------------

def _fleet_file(tmp_path, monkeypatch, profile: str, host: str = "gpu-node-07"):
    """A fleet file that assigns ``host`` the profile ``profile`` (a name or a path)."""
    import yaml

    from mi300x_cert.config import load_profile

    cards = len(load_profile(profile).host.card_ids)
    f = tmp_path / "fleet.yaml"
    f.write_text(yaml.safe_dump({"servers": [{"name": host, "profile": str(profile), "sku": "smoke", "cards": cards}]}))
    monkeypatch.setenv("MI300X_CERT_FLEET", str(f))
    return f


def _skipping_run(make_complete_run, planned=("bare-metal", "sd-throughput")):
    """A complete run whose own stored profile skipped every experiment but ``planned`` (as a run
    whose profile lost its sections, or that predates them, would): the skipped suites say skipped."""
    from mi300x_cert.experiments import all_experiments

    rd = make_complete_run()
    suites = {"latency": {"suite": "latency", "success": True, "status": "passed", "failures": []},
              "thermal": {"suite": "thermal", "success": True, "status": "passed", "failures": []},
              "network": {"suite": "network", "success": True, "status": "passed", "failures": []}}
    for e in all_experiments():
        for s in e.suites:
            if s not in suites:
                suites[s] = {"suite": s, "success": True, "status": "skipped", "failures": [],
                             "skipped": "run predates the experiment", "reason": f"skipped: the run predates the {e.name} experiment"}
    rd.write_json("validation/verdicts.json", {"success": True, "suites": suites})
    cond = rd.read_json("conditions.json")
    cond["enabled_experiments"] = list(planned)
    rd.write_json("conditions.json", cond)
    return rd


def test_decide_names_a_required_suite_that_was_skipped():
    d = decide(state="complete", verdicts={"suites": {**SUITES_OK, "whisper": {
        "status": "skipped", "success": True, "skipped": "run predates the experiment"}}},
        required=["latency", "thermal", "whisper"], required_by="the fleet profile 'smoke' of host h")
    assert not d.certified and d.missing_suites == ["whisper"] and d.skipped_suites == []
    assert d.reasons == ["required suite whisper missing (skipped: run predates the experiment): "
                         "required by the fleet profile 'smoke' of host h"], d.reasons


def test_a_host_that_skips_a_suite_its_fleet_profile_requires_is_not_certified(
        make_complete_run, reg, enrolled, tmp_path, monkeypatch):
    """Review finding: a run whose own profile lost the whisper section skipped whisper and was
    CERTIFIED. Where the fleet assigns the host a profile, the suites of the experiments it enables
    are required: register, verify and the signed statement all say NOT CERTIFIED, naming them."""
    from mi300x_cert.bundle import verify_bundle

    enrolled()
    monkeypatch.setenv("MI300X_CERT_FLEET", str(tmp_path / "no-fleet.yaml"))  # no fleet: today's behaviour
    rd = _skipping_run(make_complete_run, planned=("bare-metal", "sd-throughput", "whisper"))
    out = conclude(bundle=build_bundle(rd.root))
    assert out["certified"], out["reasons"]

    _fleet_file(tmp_path, monkeypatch, "smoke")  # smoke enables every experiment
    rd = _skipping_run(make_complete_run, planned=("bare-metal", "sd-throughput", "whisper"))
    bundle = build_bundle(rd.root)
    statement = json.loads((bundle / "statement.json").read_text())
    assert statement["predicate"]["certification"]["certified"] is False  # the signed claim says so too
    assert statement["predicate"]["certification"]["verdict"]["required"]["suites"][-1] == "network"
    v = verify_bundle(bundle)
    assert v["decision"]["certified"] is False
    assert any(r.startswith("required suite whisper missing (skipped: run predates the experiment): required by "
                            "the fleet profile 'smoke' of host gpu-node-07") for r in v["decision"]["reasons"]), v["decision"]
    out = conclude(bundle=bundle)
    assert not out["certified"] and not out["refused"]
    assert any(r.startswith("required suite whisper missing") for r in out["reasons"]), out["reasons"]
    assert not any("resnet50" in r for r in out["reasons"])  # not planned for the run (the trigger's choice)
    assert reg.get_certification("gpu-node-07", rd.run_id)["verdicts"]["whisper"] is None

    # the operator chose the experiments (a DAG run's conf): only theirs are required
    rd = _skipping_run(make_complete_run, planned=("bare-metal", "sd-throughput", "whisper"))
    out = conclude(bundle=build_bundle(rd.root), experiments=["bare-metal", "sd-throughput"])
    assert not out["certified"]  # the statement signed on the host (its plan named whisper) does not claim it
    rd = _skipping_run(make_complete_run)
    out = conclude(bundle=build_bundle(rd.root), experiments=["bare-metal", "sd-throughput"])
    assert out["certified"], out["reasons"]


def test_a_fleet_profile_that_disables_an_experiment_does_not_require_it(make_complete_run, reg, enrolled, tmp_path,
                                                                         monkeypatch):
    import yaml

    enrolled()
    prof = yaml.safe_load((Path(__file__).resolve().parents[2] / "include" / "profiles" / "smoke.yaml").read_text())
    for name in ("whisper", "resnet50", "hardware-ceilings"):
        prof["experiments"][name] = {"enabled": False}
    p = tmp_path / "two-experiments.yaml"
    p.write_text(yaml.safe_dump(prof))
    _fleet_file(tmp_path, monkeypatch, str(p))
    rd = _skipping_run(make_complete_run, planned=("bare-metal", "sd-throughput", "whisper"))
    out = conclude(bundle=build_bundle(rd.root))
    assert out["certified"], out["reasons"]
    # the same fleet profile, a run without evidence of an experiment it enables
    rd = make_complete_run()  # latency and thermal only: network not evaluated
    out = conclude(bundle=build_bundle(rd.root))
    assert not out["certified"] and any(r.startswith("required suite network missing") for r in out["reasons"]), out


def test_a_run_without_a_bundle_names_the_required_suites(reg, tmp_path, monkeypatch):
    _fleet_file(tmp_path, monkeypatch, "smoke", host="host-x")
    out = conclude(host="host-x", run_id="r-1", state="complete", verdicts={"latency": SUITES_OK["latency"]},
                   experiments=["sd-throughput"])
    assert out["reasons"] == ["required suite network missing: required by the fleet profile 'smoke' of host host-x "
                              "(experiments chosen for the run: sd-throughput)", "no signed bundle"], out["reasons"]
