"""Certificate bundles: layout, statement, signature, tamper evidence, keys, OpenSSL interop."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from mi300x_cert.bundle import BUNDLE_FILES, build_bundle, verify_bundle
from mi300x_cert.bundle.keys import generate_key_file
from mi300x_cert.errors import BundleError, RunDirError, VerifyError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "certificates.md"


def _pub_of(private: Path, out: Path) -> Path:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

    key = load_pem_private_key(private.read_bytes(), password=None)
    out.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return out


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".bundle.") or p.name == "bundle")


def test_bundle_layout_statement_and_development_key(make_complete_run, signing_env):
    rd = make_complete_run()
    bundle = build_bundle(rd.root)
    assert bundle == rd.root / "bundle"
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*BUNDLE_FILES, "artifacts"])
    assert _leftovers(rd.root) == ["bundle"]

    manifest = json.loads((bundle / "manifest.json").read_text())
    names = [a["name"] for a in manifest["artifacts"]]
    assert names == sorted(names)
    assert names == ["conditions.json", "inventory.json", "profile.yaml", "results/sd-throughput/rows.csv",
                     "run.json", "validation/verdicts.json"]
    for a in manifest["artifacts"]:
        copy = bundle / a["path"]
        assert copy.read_bytes() == (rd.root / a["name"]).read_bytes()
        assert a["size"] == copy.stat().st_size
    sums = (bundle / "SHA256SUMS").read_text().splitlines()
    assert sums == [f"{a['sha256']}  artifacts/{a['name']}" for a in manifest["artifacts"]]

    statement = json.loads((bundle / "statement.json").read_text())
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://in-toto.io/attestation/test-result/v0.1"
    assert [(s["name"], s["digest"]["sha256"]) for s in statement["subject"]] == \
        [(a["name"], a["sha256"]) for a in manifest["artifacts"]]
    pred = statement["predicate"]
    assert pred["result"] == "PASSED"
    assert pred["passedTests"] == ["latency", "thermal"] and pred["failedTests"] == []
    assert pred["configuration"][0]["name"] == "profile.yaml"
    assert pred["configuration"][0]["digest"]["sha256"] == dict(zip(names, [a["sha256"] for a in manifest["artifacts"]]))["profile.yaml"]
    cert = pred["certification"]
    assert cert["host"] == "gpu-node-07" and cert["sku"] == "mi300x" and cert["profile"] == "smoke"
    assert cert["serials"] == ["SN-0", "SN-1"] and len(cert["cards"]) == 2
    assert cert["conditions"] == {"sd-throughput": {"model": "synthetic:sd-v1-4", "dtype": "fp32"}}
    assert cert["started"] and cert["finished"] and cert["run_id"] == rd.run_id
    assert cert["versions"]["inventory"] == {"torch": "2.13.0", "rocm": "7.0"}
    assert cert["certified"] is True
    assert pred["bundle"]["signer"]["development_key"] is True
    assert any("development key" in n for n in cert["notes"])

    envelope = json.loads((bundle / "envelope.dsse.json").read_text())
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    key_info = json.loads((bundle / "key-info.json").read_text())
    assert key_info == {"keyid": envelope["signatures"][0]["keyid"], "scheme": "ecdsa-sha2-nistp256",
                        "development_key": True}

    dev_key = signing_env / "dev-signing-key.pem"
    assert dev_key.is_file() and stat.S_IMODE(dev_key.stat().st_mode) == 0o600

    result = verify_bundle(bundle)
    assert result["ok"] is True and result["artifacts"] == 6 and result["result"] == "PASSED"
    assert result["development_key"] is True and result["trusted"] is False
    assert result["keyid"] == key_info["keyid"]

    # the development key is reused, not regenerated
    rd2 = make_complete_run()
    assert verify_bundle(build_bundle(rd2.root))["keyid"] == key_info["keyid"]


def test_flipping_any_byte_of_any_file_fails_verification(make_complete_run):
    bundle = build_bundle(make_complete_run().root)
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    assert len(files) == 6 + len(BUNDLE_FILES)
    checked = 0
    for f in files:
        original = f.read_bytes()
        positions = sorted({0, len(original) // 2, len(original) - 1})
        for pos in positions:
            tampered = bytearray(original)
            tampered[pos] ^= 0x01
            f.write_bytes(bytes(tampered))
            try:
                with pytest.raises(VerifyError):
                    verify_bundle(bundle)
            finally:
                f.write_bytes(original)
            checked += 1
    assert checked >= len(files) * 2
    assert verify_bundle(bundle)["ok"] is True


def test_error_names_the_tampered_file(make_complete_run):
    bundle = build_bundle(make_complete_run().root)
    art = bundle / "artifacts" / "results" / "sd-throughput" / "rows.csv"
    art.write_text(art.read_text().replace("2.05", "1.05"))
    with pytest.raises(VerifyError, match="artifacts/results/sd-throughput/rows.csv"):
        verify_bundle(bundle)


def test_extra_or_missing_files_fail(make_complete_run):
    bundle = build_bundle(make_complete_run().root)
    extra = bundle / "artifacts" / "smuggled.txt"
    extra.write_text("not signed\n")
    with pytest.raises(VerifyError, match="smuggled.txt"):
        verify_bundle(bundle)
    extra.unlink()
    top = bundle / "notes.txt"
    top.write_text("x")
    with pytest.raises(VerifyError, match="notes.txt"):
        verify_bundle(bundle)
    top.unlink()
    victim = bundle / "artifacts" / "run.json"
    saved = victim.read_bytes()
    victim.unlink()
    with pytest.raises(VerifyError, match="run.json"):
        verify_bundle(bundle)
    victim.write_bytes(saved)
    for name in BUNDLE_FILES:
        p = bundle / name
        saved = p.read_bytes()
        p.unlink()
        with pytest.raises(VerifyError, match=re.escape(name)):
            verify_bundle(bundle)
        p.write_bytes(saved)
    assert verify_bundle(bundle)["ok"] is True


def test_configured_key_wrong_key_and_trust(make_complete_run, tmp_path, monkeypatch):
    key_a = generate_key_file(tmp_path / "keys" / "a.pem")
    key_b = generate_key_file(tmp_path / "keys" / "b.pem")
    pub_a = _pub_of(key_a, tmp_path / "keys" / "a.pub.pem")
    pub_b = _pub_of(key_b, tmp_path / "keys" / "b.pub.pem")
    monkeypatch.setenv("MI300X_CERT_SIGNING_KEY", str(key_a))
    bundle = build_bundle(make_complete_run().root)
    assert json.loads((bundle / "key-info.json").read_text())["development_key"] is False

    with pytest.raises(VerifyError, match="signature"):
        verify_bundle(bundle, key=pub_b)
    ok = verify_bundle(bundle, key=pub_a)
    assert ok["trusted"] is True and ok["development_key"] is False

    # without --key: trusted because the bundle's key is the configured one
    assert verify_bundle(bundle)["trusted"] is True
    monkeypatch.delenv("MI300X_CERT_SIGNING_KEY")
    assert verify_bundle(bundle)["trusted"] is False
    monkeypatch.setenv("MI300X_CERT_VERIFY_KEY", str(pub_a))
    assert verify_bundle(bundle)["trusted"] is True
    monkeypatch.setenv("MI300X_CERT_VERIFY_KEY", str(pub_b))
    assert verify_bundle(bundle)["trusted"] is False

    # a key swapped in with a fresh signature over the same statement is still caught: the statement
    # names the original signer, so signer.pub.pem / key-info.json no longer match it
    from mi300x_cert.bundle.keys import load_signer
    from mi300x_cert.bundle.manifest import canonical_json
    from mi300x_cert.bundle.signing import sign_payload

    forger = load_signer(key_b)
    (bundle / "envelope.dsse.json").write_bytes(
        canonical_json(sign_payload((bundle / "statement.json").read_bytes(), forger.signer)))
    (bundle / "signer.pub.pem").write_bytes(forger.public_pem)
    with pytest.raises(VerifyError):
        verify_bundle(bundle)


def test_explicit_key_argument_signs(make_complete_run, tmp_path):
    key = generate_key_file(tmp_path / "k.pem")
    bundle = build_bundle(make_complete_run().root, key=key)
    assert verify_bundle(bundle, key=_pub_of(key, tmp_path / "k.pub.pem"))["ok"]


def test_bad_keys_name_the_file_and_write_nothing(make_complete_run, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    rd = make_complete_run()
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    with pytest.raises(BundleError, match=r"p384\.pem.*P-256"):
        build_bundle(rd.root, key=p384)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(BundleError, match="garbage.pem"):
        build_bundle(rd.root, key=garbage)
    with pytest.raises(BundleError, match="missing-key.pem"):
        build_bundle(rd.root, key=tmp_path / "missing-key.pem")
    assert _leftovers(rd.root) == []


@pytest.mark.parametrize("state", ["running", "failed"])
def test_incomplete_run_is_refused_and_leaves_no_bundle(make_complete_run, state):
    rd = make_complete_run(complete=False)
    if state == "failed":
        rd.mark_failed("a worker crashed")
    with pytest.raises(RunDirError, match=state):
        build_bundle(rd.root)
    assert _leftovers(rd.root) == []


def test_missing_verdicts_are_stated_not_fatal(make_complete_run):
    rd = make_complete_run(verdicts=False)
    (rd.root / "conditions.json").unlink()
    bundle = build_bundle(rd.root)
    pred = json.loads((bundle / "statement.json").read_text())["predicate"]
    assert pred["result"] == "FAILED"
    cert = pred["certification"]
    assert cert["verdict"]["present"] is False and "verdicts.json" in cert["verdict"]["note"]
    assert cert["certified"] is False and cert["conditions_present"] is False
    assert "validation/verdicts.json is missing" in cert["notes"]
    assert verify_bundle(bundle)["result"] == "FAILED"


def test_failed_suite_is_failed_result(make_complete_run):
    bundle = build_bundle(make_complete_run(success=False).root)
    pred = json.loads((bundle / "statement.json").read_text())["predicate"]
    assert pred["result"] == "FAILED"
    assert pred["passedTests"] == ["latency"]
    assert pred["failedTests"] == ["thermal", "thermal/expect_column_max_to_be_between[junction_c]"]
    assert pred["certification"]["certified"] is False


def test_cli_sign_says_what_it_signed(make_complete_run, capsys):
    from mi300x_cert import cli

    rd = make_complete_run(verdicts=False)
    assert cli.main(["sign", str(rd.root)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(rd.root / "bundle")
    assert err.strip() == ("signed: result FAILED (validation/verdicts.json is missing: no expectation was evaluated); "
                           "development key: not a production certificate")


def test_cli_verify_exit_status_follows_the_one_decision(make_complete_run, capsys):
    """2: untrusted signer (or tampered); 1: intact and trusted but NOT CERTIFIED; 0: CERTIFIED.
    --integrity-only: 0 for any intact bundle, trust not asked."""
    from mi300x_cert import cli
    from mi300x_cert.bundle.keys import load_signer
    from mi300x_cert.registry import open_registry

    failed = build_bundle(make_complete_run(success=False).root)
    assert cli.main(["verify", str(failed)]) == 2  # the development key is enrolled for nobody
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert res["trusted"] is False and "not enrolled for host gpu-node-07" in res["trust_reason"]
    assert "NOT a trusted key: key" in err
    assert cli.main(["verify", "--integrity-only", str(failed)]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert res["result"] == "FAILED" and res["certified"] is False
    assert res["failed_tests"] == ["thermal", "thermal/expect_column_max_to_be_between[junction_c]"]
    assert f"signature and {res['artifacts']} artifact digests OK" in err and "trust not checked" in err
    assert "NOT CERTIFIED (result FAILED; failed: thermal," in err

    open_registry().enroll_key("gpu-node-07", load_signer().public_pem, by="test")
    assert cli.main(["verify", str(failed)]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["decision"]["reasons"] == ["failed suites: thermal"]
    assert "trusted (registry)" in err
    passed = build_bundle(make_complete_run().root)
    assert cli.main(["verify", str(passed)]) == 0
    assert "CERTIFIED (result PASSED)" in capsys.readouterr().err
    (passed / "artifacts" / "run.json").write_text("{}")
    assert cli.main(["verify", str(passed)]) == 2
    assert "error: artifacts/run.json does not match its signed digest" in capsys.readouterr().err


def test_rebuild_replaces_bundle_and_failure_leaves_old_one(make_complete_run, monkeypatch):
    rd = make_complete_run()
    first = build_bundle(rd.root)
    first_env = (first / "envelope.dsse.json").read_bytes()
    second = build_bundle(rd.root)
    assert second == first and (second / "envelope.dsse.json").read_bytes() != first_env  # fresh signature
    assert _leftovers(rd.root) == ["bundle"] and verify_bundle(second)["ok"]

    import mi300x_cert.bundle.signing as signing

    def boom(*a, **k):
        raise RuntimeError("signer unavailable")

    monkeypatch.setattr(signing, "sign_payload", boom)
    before = (second / "envelope.dsse.json").read_bytes()
    with pytest.raises(BundleError, match="signer unavailable"):
        build_bundle(rd.root)
    assert _leftovers(rd.root) == ["bundle"]
    assert (second / "envelope.dsse.json").read_bytes() == before


def test_symlink_in_run_dir_is_refused(make_complete_run, tmp_path):
    rd = make_complete_run()
    (tmp_path / "outside.txt").write_text("secret\n")
    os.symlink(tmp_path / "outside.txt", rd.root / "link.txt")
    with pytest.raises(BundleError, match="link.txt"):
        build_bundle(rd.root)
    assert _leftovers(rd.root) == []


def _openssl_script() -> str:
    text = DOCS.read_text()
    m = re.search(r"```bash\n(# verify-with-openssl\n.*?)```", text, re.S)
    assert m, "docs/certificates.md lost its verify-with-openssl block"
    return m.group(1)


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("sha256sum") is None,
                    reason="openssl / sha256sum not installed")
def test_openssl_alone_verifies_a_fresh_bundle(make_complete_run, tmp_path):
    bundle = build_bundle(make_complete_run().root)
    script = _openssl_script()

    def run(env_extra=None):
        env = {**os.environ, **(env_extra or {})}
        return subprocess.run(["bash", "-c", script], cwd=bundle, capture_output=True, text=True, env=env, timeout=60)

    r = run()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Verified OK" in r.stdout and "Signature Verified Successfully" in r.stdout
    assert r.stdout.strip().endswith("bundle verified")
    assert verify_bundle(bundle)["ok"]  # the script left nothing behind in the bundle

    other = _pub_of(generate_key_file(tmp_path / "other.pem"), tmp_path / "other.pub.pem")
    assert run({"PUB": str(other)}).returncode != 0

    stmt = bundle / "statement.json"
    saved = stmt.read_bytes()
    stmt.write_bytes(saved.replace(b'"PASSED"', b'"PASSEX"'))
    assert run().returncode != 0
    stmt.write_bytes(saved)

    art = bundle / "artifacts" / "run.json"
    art.write_bytes(art.read_bytes() + b" ")
    r = run()
    assert r.returncode != 0 and "artifacts/run.json" in r.stdout + r.stderr


def test_verdict_summary_of_the_validation_output_shape():
    from mi300x_cert.bundle.signing import summarize_verdicts

    fail = {"suite": "thermal", "expectation": "junction_max", "type": "expect_column_max_to_be_between",
            "column": "junction_c", "subject": "card 13", "observed": 81.0}
    verdicts = {
        "success": False, "not_validated": ["resnet50"], "thresholds": "mi300x",
        "suites": {
            "latency": {"suite": "latency", "success": True, "status": "passed", "failures": [], "evaluated": 4},
            "thermal": {"suite": "thermal", "success": False, "status": "failed", "failures": [fail, {**fail, "subject": "card 14"}]},
            "whisper": {"suite": "whisper", "success": True, "status": "skipped", "reason": "skipped: experiment disabled",
                        "failures": []},
        },
    }
    s = summarize_verdicts(verdicts)
    assert s["result"] == "FAILED"
    assert s["passedTests"] == ["latency"]
    assert s["failedTests"] == ["thermal", "thermal/junction_max[junction_c]", "resnet50 (not validated)"]
    assert s["summary"]["skipped"] == ["whisper"] and s["summary"]["suites"]["thermal"]["failures"] == 2
    assert s["summary"]["not_validated"] == ["resnet50"]

    ok = summarize_verdicts({"success": True, "suites": {k: v for k, v in verdicts["suites"].items() if k != "thermal"}})
    assert ok["result"] == "PASSED" and ok["passedTests"] == ["latency"]
    assert summarize_verdicts({"success": True, "suites": {}})["result"] == "FAILED"
    assert summarize_verdicts([1, "x"])["result"] == "FAILED"  # garbage never crashes
