"""The fleet registry on SQLite: schema and migrations, URL resolution and errors, keys,
certifications with drift flags, fleet view, per-serial history, alerts, expiry audit, import of a
state directory written by today's file writers, and the CLI. Concurrency (SQLite and PostgreSQL)
is in test_registry_concurrency.py."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

from mi300x_cert.cli import main  # noqa: E402
from mi300x_cert.errors import CertError, RegistryConflict, RegistryError  # noqa: E402
from mi300x_cert.history import UnknownSerialError  # noqa: E402
from mi300x_cert.registry import DriftRule, Registry, mask_url, open_registry, registry_url  # noqa: E402

T0 = "2026-11-01T02:00:00+00:00"


@pytest.fixture(autouse=True)
def _fresh_cache():
    from mi300x_cert.registry import close_all

    yield
    close_all()


@pytest.fixture
def url(tmp_path, monkeypatch) -> str:
    u = f"sqlite:///{tmp_path / 'reg.db'}"
    monkeypatch.setenv("MI300X_CERT_REGISTRY_URL", u)
    return u


@pytest.fixture
def reg(url) -> Registry:
    r = Registry(url)
    yield r
    r.close()


def _cert(host="h1", run_id="r1", result="CERTIFIED", **kw) -> dict:
    base = {"host": host, "run_id": run_id, "result": result, "sku": "mi300x", "profile": "mi300x",
            "started": T0, "finished": "2026-11-01T03:00:00+00:00", "bundle_digest": f"sha256:{host}-{run_id}",
            "verdicts": {"thermal": result == "CERTIFIED", "latency": True}, "source": "register"}
    base.update(kw)
    return base


def _cards(n=4, *, date=T0, sd=1.0, p95=60.0, mem=70.0, prefix="SN", start=0) -> list[dict]:
    return [{"serial": f"{prefix}-{i}", "card": i - start, "name": "AMD Instinct MI300X", "bus_id": f"0000:{i:02x}:00.0",
             "date": date, "idle_junction_mean_c": 35.0, "active_junction_p95_c": p95, "memory_max_c": mem,
             "active_power_mean_w": 600.0, "sd_per_image_median_s": sd, "sd_batches": 3, "card_ok": True,
             "failures": []} for i in range(start, start + n)]


# ---- schema, migrations, URL ----------------------------------------------------------------------
def test_first_open_creates_the_schema_at_head(reg, capsys):
    st = reg.status()
    assert st["revision"] == reg.head() == "0002" and st["up_to_date"]
    assert set(st["counts"]) >= {"hosts", "keys", "certifications", "card_results", "failed_expectations", "alerts",
                                 "alert_events"}
    assert main(["registry", "status"]) == 0
    assert "revision 0002 (head 0002)" in capsys.readouterr().out
    assert main(["registry", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["up_to_date"] is True


def test_migrations_match_the_schema_and_the_head_constant(reg):
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from mi300x_cert.registry import schema

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(schema.__file__).parent / "migrations"))
    assert ScriptDirectory.from_config(cfg).get_current_head() == schema.SCHEMA_HEAD
    with reg.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert diffs == []


def test_a_database_behind_its_schema_asks_for_registry_upgrade(tmp_path, capsys):
    u = f"sqlite:///{tmp_path / 'old.db'}"
    with pytest.raises(RegistryError, match="mi300x-cert registry upgrade"):
        Registry(u, auto_upgrade=False)
    assert main(["registry", "status", "--registry", u]) == 2
    assert "registry upgrade" in capsys.readouterr().out
    assert main(["registry", "upgrade", "--registry", u]) == 0
    assert Registry(u, auto_upgrade=False).revision() == "0002"
    assert main(["registry", "upgrade", "--registry", u]) == 0  # idempotent


def test_bad_urls_are_one_registry_error_with_the_password_masked(tmp_path):
    with pytest.raises(RegistryError, match="cannot be used") as e:
        Registry("nosuchdb://u:hunter22@x/y")
    assert "hunter22" not in str(e.value) and isinstance(e.value, CertError)
    t = time.monotonic()
    with pytest.raises(RegistryError) as e:  # nothing listens on port 1
        Registry("postgresql://cert:hunter22@127.0.0.1:1/fleet")
    assert time.monotonic() - t < 10
    assert "hunter22" not in str(e.value) and "cert:***@127.0.0.1:1/fleet" in str(e.value)
    assert mask_url("postgresql+psycopg2://a:b@h/d") == "postgresql+psycopg2://a:***@h/d"
    assert mask_url("sqlite:////x/y.db") == "sqlite:////x/y.db"


def test_cli_reports_an_unreachable_registry_without_a_traceback(capsys):
    assert main(["fleet", "--registry", "postgresql://u:pw123456@127.0.0.1:1/db"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: registry postgresql+psycopg2://u:***@127.0.0.1:1/db") and "Traceback" not in err


def test_url_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MI300X_CERT_REGISTRY_URL", raising=False)
    monkeypatch.setenv("MI300X_CERT_REGISTRY_CONN_ID", "no_such_connection_here")
    monkeypatch.setenv("MI300X_CERT_STATE_DIR", str(tmp_path / "state"))
    assert registry_url() == f"sqlite:///{(tmp_path / 'state').resolve() / 'registry.db'}"
    monkeypatch.setenv("MI300X_CERT_REGISTRY_URL", "postgres://a:b@db:5432/fleet")
    assert registry_url() == "postgresql+psycopg2://a:b@db:5432/fleet"


def test_url_from_an_airflow_connection(tmp_path):
    """In a fresh interpreter (importing Airflow configures its logging for the whole process)."""
    import importlib.util
    import os
    import subprocess

    if importlib.util.find_spec("airflow") is None:
        pytest.skip("Airflow is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MI300X_CERT_REGISTRY")}
    env.update(AIRFLOW_CONN_MI300X_CERT_REGISTRY="postgres://cert:secret-pw@db.internal:5432/fleet",
               AIRFLOW_HOME=str(tmp_path / "airflow"))
    code = "from mi300x_cert.registry import registry_url; print(registry_url())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "postgresql+psycopg2://cert:secret-pw@db.internal:5432/fleet"


def test_open_registry_is_cached_per_url(url):
    assert open_registry(url) is open_registry(url) is open_registry()


def test_package_import_is_light():
    import subprocess

    code = "import sys, mi300x_cert.registry; print('sqlalchemy' in sys.modules, 'alembic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_upsert_host_keeps_what_it_is_not_given(reg):
    h = reg.upsert_host("h1", sku="mi300x", profile="mi300x", cards=16, valid_days=7)
    assert (h["sku"], h["cards"], h["valid_days"]) == ("mi300x", 16, 7) and h["first_seen"] == h["last_seen"]
    h2 = reg.upsert_host("h1", cards=8)
    assert (h2["sku"], h2["cards"], h2["valid_days"]) == ("mi300x", 8, 7) and h2["first_seen"] == h["first_seen"]
    with pytest.raises(RegistryError, match="valid_days"):
        reg.upsert_host("h1", valid_days=0)
    with pytest.raises(RegistryError, match="host is required"):
        reg.upsert_host("")


# ---- keys -----------------------------------------------------------------------------------------
def _pub_pem() -> bytes:
    from securesystemslib.signer import CryptoSigner

    from mi300x_cert.bundle.keys import public_pem

    signer = CryptoSigner.generate_ecdsa()
    return public_pem(signer._private_key.public_key())


def test_keys_enroll_trust_revoke(reg):
    pem = _pub_pem()
    k = reg.enroll_key("h1", pem, by="admin", note="first")
    from mi300x_cert.bundle.keys import public_key_from_pem

    assert k["keyid"] == public_key_from_pem(pem, "x")[0].keyid and k["host"] == "h1" and not k["revoked"]
    assert reg.enroll_key("h1", pem, by="someone else") == k  # no-op
    with pytest.raises(RegistryError, match=r"already enrolled for host 'h1'.*host 'h2'"):
        reg.enroll_key("h2", pem, by="admin")
    assert reg.trusted_key("h1", k["keyid"])["keyid"] == k["keyid"]
    assert reg.trusted_key("h2", k["keyid"]) is None
    assert reg.get_key(k["keyid"])["public_pem"].startswith("-----BEGIN PUBLIC KEY-----")
    assert [x["keyid"] for x in reg.list_keys()] == [k["keyid"]] and reg.list_keys(host="h2") == []
    r = reg.revoke_key(k["keyid"], by="admin", reason="host rebuilt")
    assert r["revoked"] and r["revoke_reason"] == "host rebuilt"
    assert reg.trusted_key("h1", k["keyid"]) is None
    with pytest.raises(RegistryError, match="revoked"):
        reg.enroll_key("h1", pem, by="admin")
    with pytest.raises(RegistryError, match="not enrolled"):
        reg.revoke_key("feedface", by="admin")
    with pytest.raises(RegistryError, match="not a PEM public key"):
        reg.enroll_key("h1", b"garbage", by="admin")
    with pytest.raises(RegistryError, match="by"):
        reg.enroll_key("h1", _pub_pem(), by="")


def test_keys_cli(reg, tmp_path, capsys):
    p = tmp_path / "signer.pub.pem"
    p.write_bytes(_pub_pem())
    assert main(["keys", "enroll", "h7", "--public-key", str(p), "--by", "admin"]) == 0
    keyid = capsys.readouterr().out.split()[2]
    assert main(["keys", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["host"] == "h7"
    assert main(["keys", "revoke", keyid, "--reason", "lost", "--by", "admin"]) == 0
    assert main(["keys", "list"]) == 0
    assert "REVOKED" in capsys.readouterr().out
    assert main(["keys", "enroll", "h7", "--public-key", str(tmp_path / "missing.pem")]) == 2


# ---- certifications ---------------------------------------------------------------------------------
def test_record_is_one_transaction_and_idempotent(reg):
    cert, created = reg.record_certification(_cert(), _cards(), [
        {"suite": "thermal", "expectation": "expect_column_max_to_be_between", "column": "junction_c", "card": 2,
         "observed": 97.5, "expected": {"max": 95}}])
    assert created and cert["id"] and len(cert["cards"]) == 4 and cert["failed"][0]["observed"] == 97.5
    assert cert["expires_at"] == "2026-12-01T03:00:00.000+00:00"  # default 30 days after finished
    again, created = reg.record_certification(_cert(), _cards(), [])
    assert not created and again["id"] == cert["id"] and len(again["cards"]) == 4
    assert reg.status()["counts"]["card_results"] == 4
    assert reg.get_certification("h1", "r1")["failed"][0]["column"] == "junction_c"
    assert reg.get_certification("h1", "nope") is None
    host = reg.get_host("h1")
    assert host["last_certification_id"] == cert["id"] == host["last_certified_id"] and host["sku"] == "mi300x"


def test_conflicting_rerecord_is_refused_and_nothing_changes(reg):
    reg.record_certification(_cert(), _cards(), [])
    with pytest.raises(RegistryConflict, match="not overwritten"):
        reg.record_certification(_cert(bundle_digest="sha256:other"), _cards(), [])
    with pytest.raises(RegistryConflict):
        reg.record_certification(_cert(result="NOT CERTIFIED"), _cards(), [])
    assert reg.get_certification("h1", "r1")["bundle_digest"] == "sha256:h1-r1"
    assert reg.status()["counts"]["certifications"] == 1


@pytest.mark.parametrize("bad, field", [
    ({"result": "PASSED"}, "certification.result"),
    ({"certified": False}, "certification.certified"),
    ({"path": "turbo"}, "certification.path"),
    ({"source": "magic"}, "certification.source"),
    ({"finished": "yesterday"}, "certification.finished"),
    ({"verdicts": {"thermal": "yes"}}, "certification.verdicts"),
    ({"colour": "red"}, "unknown field(s) colour"),
    ({"host": ""}, "certification.host"),
])
def test_bad_certification_is_one_error_naming_the_field(reg, bad, field):
    with pytest.raises(RegistryError, match=re_escape(field)):
        reg.record_certification(_cert(**bad), _cards(), [])
    assert reg.status()["counts"]["certifications"] == 0 and reg.status()["counts"]["hosts"] == 0


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


def test_bad_card_rows_leave_nothing(reg):
    cards = _cards()
    cards[1]["serial"] = cards[0]["serial"]
    with pytest.raises(RegistryError, match=r"cards\[1\].serial"):
        reg.record_certification(_cert(), cards, [])
    cards = _cards()
    cards[2]["memory_max_c"] = "hot"
    with pytest.raises(RegistryError, match=r"cards\[2\].memory_max_c"):
        reg.record_certification(_cert(), cards, [])
    assert reg.status()["counts"]["certifications"] == 0


def test_list_certifications_newest_first(reg):
    for i in range(5):
        reg.record_certification(_cert(run_id=f"r{i}", registered_at=f"2026-11-0{i + 1}T00:00:00Z"), [], [])
    reg.record_certification(_cert(host="h2", run_id="x", registered_at="2026-11-09T00:00:00Z"), [], [])
    assert [c["run_id"] for c in reg.list_certifications()] == ["x", "r4", "r3", "r2", "r1", "r0"]
    assert [c["run_id"] for c in reg.list_certifications(host="h1", limit=2, offset=1)] == ["r3", "r2"]


def test_an_older_run_recorded_late_does_not_become_the_hosts_last(reg):
    new, _ = reg.record_certification(_cert(run_id="new", finished="2026-11-10T00:00:00Z"), [], [])
    reg.record_certification(_cert(run_id="old", finished="2026-11-01T00:00:00Z", result="NOT CERTIFIED"), [], [])
    assert reg.get_host("h1")["last_certification_id"] == new["id"]
    assert reg.fleet()[0]["run_id"] == "new"


# ---- drift -----------------------------------------------------------------------------------------
def test_drift_against_the_cards_previous_certification(reg):
    reg.record_certification(_cert(run_id="w1"), _cards(date=T0), [])
    slow = _cards(date="2026-11-08T02:00:00Z")
    slow[1]["sd_per_image_median_s"] = 1.06          # 6 % slower
    slow[2]["active_junction_p95_c"] = 64.0           # 4 °C: under the 5 °C rule
    slow[3]["memory_max_c"] = 75.5                    # 5.5 °C hotter
    slow[0]["sd_per_image_median_s"] = None           # no number, no flag
    cert, _ = reg.record_certification(_cert(run_id="w2", started="2026-11-08T02:00:00Z",
                                             finished="2026-11-08T03:00:00Z"), slow, [])
    flags = {(f["serial"], f["metric"], f["against"]) for f in cert["drift"]}
    assert flags == {("SN-1", "sd_per_image_median_s", "previous"), ("SN-3", "memory_max_c", "previous")}
    f = next(f for f in cert["drift"] if f["serial"] == "SN-1")
    assert f["value"] == 1.06 and f["reference"] == 1.0 and f["delta"] == pytest.approx(0.06)
    hist = reg.serial_history("SN-1")
    assert [h["run_id"] for h in hist] == ["w1", "w2"] and hist[0]["drift"] == [] and hist[1]["drift"]
    # a stricter rule from the fleet file flags the 4 °C too
    cert3, _ = reg.record_certification(_cert(run_id="w3", started="2026-11-15T02:00:00Z"),
                                        _cards(date="2026-11-15T02:00:00Z", p95=68.0), [],
                                        drift_rule=DriftRule(slower_pct=50, hotter_c=3))
    assert {(f["metric"], f["against"]) for f in cert3["drift"] if f["serial"] == "SN-0"} == {
        ("active_junction_p95_c", "previous")}


def test_drift_against_the_sku_median_of_the_fleet(reg):
    for h in range(3):  # 3 hosts × 4 cards of the SKU at 1.00 s / 60 °C
        reg.record_certification(_cert(host=f"f{h}", run_id="a"), _cards(prefix=f"F{h}"), [])
    hot = _cards(prefix="NEW", sd=1.2, p95=70.0)
    cert, _ = reg.record_certification(_cert(host="n1", run_id="a"), hot, [])
    against = {(f["metric"], f["against"]) for f in cert["drift"] if f["serial"] == "NEW-0"}
    assert against == {("sd_per_image_median_s", "sku_median"), ("active_junction_p95_c", "sku_median")}
    other, _ = reg.record_certification(_cert(host="n2", run_id="a", sku="h100"), _cards(prefix="H", sd=9.0), [])
    assert other["drift"] == []  # no fleet median for a SKU with no other cards


def test_drift_rule_validation_and_fleet_file_key(tmp_path):
    with pytest.raises(ValueError, match="slower_pct"):
        DriftRule(slower_pct=0)
    from mi300x_cert.errors import ProfileError
    from mi300x_cert.fleet import load_fleet

    p = tmp_path / "fleet.yaml"
    p.write_text("servers:\n  - {name: a, profile: smoke, sku: smoke, cards: 16, valid_days: 7}\n"
                 "drift: {slower_pct: 10, hotter_c: 3}\n")
    f = load_fleet(p)
    assert f.drift_rule() == DriftRule(slower_pct=10, hotter_c=3)
    assert f.registry_hosts() == [{"name": "a", "sku": "smoke", "profile": "smoke", "valid_days": 7}]
    p.write_text("servers:\n  - {name: a, profile: smoke, sku: smoke, cards: 16}\ndrift: {hotter_c: -1}\n")
    with pytest.raises(ProfileError, match="drift.hotter_c"):
        load_fleet(p)


# ---- fleet view, history -----------------------------------------------------------------------------
def test_fleet_view(reg, capsys):
    now = "2026-11-20T00:00:00Z"
    reg.record_certification(_cert(host="ok", run_id="1", finished="2026-11-19T00:00:00Z"), [], [])
    reg.record_certification(_cert(host="old", run_id="1", finished="2026-10-01T00:00:00Z"), [], [])
    reg.record_certification(_cert(host="bad", run_id="1", finished="2026-11-18T00:00:00Z"), [], [])
    reg.record_certification(_cert(host="bad", run_id="2", result="NOT CERTIFIED",
                                   finished="2026-11-19T00:00:00Z"), [], [])
    reg.raise_alert(host="bad", run_id="2", suite="thermal", kind="expectation", message="hot")
    rows = {r["host"]: r for r in reg.fleet(now=now, hosts=[{"name": "ok"}, {"name": "new", "sku": "h100"}])}
    assert set(rows) == {"ok", "old", "bad", "new"}
    assert rows["ok"]["status"] == "certified" and rows["ok"]["certified_now"] and rows["ok"]["age_s"] == 86400
    assert rows["old"]["status"] == "expired" and rows["old"]["expired"] and not rows["old"]["certified_now"]
    assert rows["bad"]["status"] == "not_certified" and rows["bad"]["result"] == "NOT CERTIFIED"
    assert rows["bad"]["open_alerts"] == 1 and rows["bad"]["certified_ever"] and rows["bad"]["run_id"] == "2"
    assert rows["new"]["status"] == "never_certified" and rows["new"]["certified_ever"] is False
    assert rows["new"]["in_fleet"] and rows["old"]["in_fleet"] is False
    fleet = Path(reg.url.split("///", 1)[1]).parent / "fleet.yaml"
    fleet.write_text("servers:\n  - {name: new, profile: smoke, sku: smoke, cards: 16}\n")
    assert main(["fleet", "--fleet", str(fleet)]) == 0
    out = capsys.readouterr().out
    assert "never certified" in out and "NOT CERTIFIED" in out and "host(s) certified now" in out
    assert main(["fleet", "--json", "--fleet", str(fleet)]) == 0
    assert {r["host"] for r in json.loads(capsys.readouterr().out)} == {"ok", "old", "bad", "new"}


def test_serial_history_and_serials(reg, capsys):
    reg.record_certification(_cert(run_id="a"), _cards(2), [])
    reg.record_certification(_cert(host="h2", run_id="b", started="2026-11-10T00:00:00Z"),
                             _cards(2, date="2026-11-10T00:00:00Z", sd=1.5), [])
    hist = reg.serial_history("SN-1")
    assert [(h["host"], h["run_id"], h["certified"]) for h in hist] == [("h1", "a", True), ("h2", "b", True)]
    assert hist[1]["drift"][0]["metric"] == "sd_per_image_median_s"
    serials = {s["serial"]: s for s in reg.list_serials()}
    assert serials["SN-1"]["runs"] == 2 and serials["SN-1"]["last_host"] == "h2"
    with pytest.raises(UnknownSerialError, match="2 serials known"):
        reg.serial_history("NOPE")
    assert main(["history", "SN-1"]) == 0
    out = capsys.readouterr().out
    assert "serial SN-1: 2 certification(s)" in out and "drift: sd_per_image_median_s +50.0% vs previous" in out
    assert main(["history", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert main(["history", "NOPE"]) == 2
    assert "unknown serial 'NOPE'" in capsys.readouterr().err


# ---- alerts -----------------------------------------------------------------------------------------
def test_alerts_idempotent_ack_reopen_events(reg, capsys):
    a, created = reg.raise_alert(host="h1", run_id="r1", suite="thermal", kind="expectation", message="too hot",
                                 failures=[{"expectation": "max", "card": 3, "observed": 99.0}], dag_id="recertify_h1")
    assert created and a["status"] == "open" and a["id"].endswith(a["id"][-10:]) and "-h1-thermal-" in a["id"]
    b, created = reg.raise_alert(host="h1", run_id="r1", suite="thermal", kind="expectation", message="too hot",
                                 failures=[{"expectation": "max", "card": 4}], report="/r/index.html")
    assert not created and b["id"] == a["id"] and b["failures"] == [{"expectation": "max", "card": 4}]
    assert b["report"] == "/r/index.html" and b["dag_id"] == "recertify_h1"
    reg.acknowledge(a["id"], by="ops", note="fans")
    c = reg.acknowledge(a["id"], by="ops2", note="again")
    assert [e["action"] for e in c["events"]] == ["raised", "raised", "acknowledged", "acknowledged"]
    assert c["acknowledged_by"] == "ops2" and c["acknowledged"]
    again, created = reg.raise_alert(host="h1", run_id="r1", suite="thermal", kind="expectation", message="x")
    assert not created and again["status"] == "acknowledged"  # a retry never reopens
    assert reg.list_alerts() == [] and len(reg.list_alerts(include_acknowledged=True)) == 1
    d = reg.reopen(a["id"], by="ops", note="came back")
    assert d["status"] == "open" and d["events"][-1]["action"] == "reopened"
    reg.raise_alert(host="h2", run_id=None, suite=None, kind="never_certified", severity="warning", message="m")
    assert [x["host"] for x in reg.list_alerts(host="h2")] == ["h2"] and len(reg.list_alerts(limit=1)) == 1
    with pytest.raises(RegistryError, match="alert.kind"):
        reg.raise_alert(host="h1", run_id="r1", suite=None, kind="bogus", message="m")
    with pytest.raises(RegistryError, match="not found"):
        reg.get_alert("nope")
    with pytest.raises(RegistryError, match="by"):
        reg.acknowledge(a["id"], by=" ")
    # CLI
    assert main(["alerts"]) == 0
    assert "error expectation host=h1 suite=thermal run=r1" in capsys.readouterr().out
    assert main(["alerts", "--ack", a["id"], "--by", "cli", "--note", "ok"]) == 0
    assert "ACKNOWLEDGED by cli" in capsys.readouterr().out
    assert main(["alerts", "--reopen", a["id"], "--by", "cli", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "open"
    assert main(["alerts", "--all", "--host", "h1", "--json"]) == 0
    assert [x["id"] for x in json.loads(capsys.readouterr().out)] == [a["id"]]
    assert main(["alerts", "--ack", "nope", "--by", "x"]) == 2


def test_update_run_links_keeps_acknowledgements(reg):
    reg.record_certification(_cert(), [], [])
    a, _ = reg.raise_alert(host="h1", run_id="r1", suite="thermal", kind="expectation", message="m",
                           data_docs="/first/dd.html")
    reg.acknowledge(a["id"], by="ops")
    assert reg.update_run_links("h1", "r1", report="/r.html", data_docs="/second/dd.html", bundle_uri="s3://b/x") == 1
    got = reg.get_alert(a["id"])
    assert got["status"] == "acknowledged" and got["report"] == "/r.html" and got["bundle_uri"] == "s3://b/x"
    assert got["data_docs"] == "/first/dd.html" and got["events"][-1]["action"] == "links"
    assert reg.get_certification("h1", "r1")["report"] == "/r.html"
    assert reg.update_run_links("h1", "other", report="/x") == 0 and reg.update_run_links("h1", "r1") == 0


def test_audit_expiry(reg, tmp_path, capsys):
    hosts = [{"name": "never"}, {"name": "fresh", "valid_days": 30}, {"name": "lapsed", "valid_days": 7},
             {"name": "failing", "valid_days": 7}]
    now = "2026-11-20T00:00:00Z"
    reg.record_certification(_cert(host="fresh", run_id="1", finished="2026-11-15T00:00:00Z"), [], [])
    reg.record_certification(_cert(host="lapsed", run_id="1", finished="2026-11-01T00:00:00Z", valid_days=7), [], [])
    reg.record_certification(_cert(host="failing", run_id="1", result="NOT CERTIFIED",
                                   finished="2026-11-02T00:00:00Z"), [], [])
    raised = reg.audit_expiry(hosts, now=now)
    kinds = {(a["host"], a["kind"]) for a in raised}
    assert kinds == {("never", "never_certified"), ("lapsed", "expired"), ("failing", "expired")}
    lapsed = next(a for a in raised if a["host"] == "lapsed")
    assert lapsed["run_id"] == "1" and lapsed["certification_id"] and "expired at 2026-11-08" in lapsed["message"]
    assert reg.audit_expiry(hosts, now=now) == raised  # idempotent: the same open alerts, nothing new
    assert len(reg.list_alerts()) == 3
    reg.acknowledge(lapsed["id"], by="ops")
    assert {a["host"] for a in reg.audit_expiry(hosts, now=now)} == {"never", "failing"}
    assert len(reg.list_alerts(include_acknowledged=True)) == 3
    # a new certification of the lapsed host that expires again is a new alert
    reg.record_certification(_cert(host="lapsed", run_id="2", finished="2026-11-21T00:00:00Z"), [], [])
    assert {a["host"] for a in reg.audit_expiry(hosts, now="2026-11-22T00:00:00Z")} == {"never", "failing"}
    assert "lapsed" in {a["host"] for a in reg.audit_expiry(hosts, now="2026-12-30T00:00:00Z")}
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("servers:\n  - {name: never, profile: smoke, sku: smoke, cards: 16}\n")
    assert main(["registry", "audit", "--fleet", str(fleet)]) == 0
    assert "never_certified host=never" in capsys.readouterr().out


# ---- import of a state directory ----------------------------------------------------------------------
def test_import_of_a_state_dir_written_by_todays_writers(reg, tmp_path, monkeypatch, capsys):
    from fake_run import make_fake_run

    from mi300x_cert import history

    state = tmp_path / "old-state"
    monkeypatch.setenv("MI300X_CERT_STATE_DIR", str(state))
    monkeypatch.delenv("MI300X_CERT_HISTORY_DIR", raising=False)
    monkeypatch.delenv("MI300X_CERT_ALERTS_DIR", raising=False)
    monkeypatch.delenv("MI300X_CERT_OUTCOMES_DIR", raising=False)
    run = make_fake_run(tmp_path / "run", hot_card=3)
    meta = json.loads((run / "run.json").read_text())
    # the DAG names a run by Airflow's run id; run.json by its directory-safe form
    host, run_id = meta["host"], "manual__2026-11-25T00:00:00+00:00"
    assert meta["run_id"] != run_id
    # the files an older version wrote (its alert, acknowledged; its outcome record; its history index)
    a = {"id": f"20261125T083941Z-{host}-thermal-0123456789", "created": "2026-11-25T08:39:41+00:00", "host": host,
         "dag_id": f"recertify_{host}", "run_id": run_id, "run_dir": str(run), "suite": "thermal",
         "failures": [{"expectation": "expect_column_max_to_be_between", "column": "junction_p95_c", "card": 3,
                       "observed": 98.0}], "report": None, "data_docs": None, "bundle_uri": None,
         "acknowledged": True, "acknowledged_by": "oncall", "acknowledged_at": "2026-11-25T09:00:00+00:00",
         "note": "checked fans"}
    (state / "alerts").mkdir(parents=True)
    (state / "alerts" / f"{a['id']}.json").write_text(json.dumps(a))
    (state / "outcomes").mkdir(parents=True)
    (state / "outcomes" / f"{host}-{run_id}.json").write_text(json.dumps({
        "recorded": "2026-11-25T09:01:00+00:00", "host": host, "dag_id": f"recertify_{host}", "run_id": run_id,
        "run_dir": str(run), "profile": "smoke", "sku": "smoke", "certified": False,
        "reasons": ["failed suites: thermal"], "verdicts": {"thermal": False, "latency": True, "network": None},
        "report": "/r.html", "bundle_uri": "s3://b/x"}))
    history.record_run(run, certified=False)
    assert list((state / "history").glob("*.jsonl"))  # the writer indexed the run's cards
    # a history-only run (no outcome record) and an unreadable file
    other = make_fake_run(tmp_path / "run2", hot_card=None)
    meta2 = json.loads((other / "run.json").read_text())
    meta2.update(run_id="run-2", host="h-other", started="2026-12-01T00:00:00+00:00")
    (other / "run.json").write_text(json.dumps(meta2))
    history.record_run(other)
    (state / "alerts" / "broken.json").write_text("{not json")

    res = reg.import_state_dir(state)
    n_cards = len(history.card_history_rows(run))
    assert res["certifications"] == 2 and res["cards"] == n_cards * 2 and res["alerts"] == 1
    assert res["acknowledgements"] == 1 and res["conflicts"] == []
    assert [p["path"] for p in res["problems"]] == [str(state / "alerts" / "broken.json")]
    cert = reg.get_certification(host, run_id)
    assert cert["result"] == "NOT CERTIFIED" and cert["source"] == "import" and cert["report"] == "/r.html"
    assert len(cert["cards"]) == n_cards and reg.get_certification(host, meta["run_id"]) is None
    assert cert["verdicts"] == {"thermal": False, "latency": True, "network": None}
    assert cert["failed"][0]["suite"] == "thermal" and cert["failed"][0]["card"] == 3
    only_hist = reg.get_certification("h-other", "run-2")
    assert only_hist["result"] == "NOT CERTIFIED" and "without an outcome record" in only_hist["reasons"][0]
    imported = reg.get_alert(a["id"])
    assert imported["status"] == "acknowledged" and imported["acknowledged_by"] == "oncall"
    assert [e["action"] for e in imported["events"]] == ["raised", "acknowledged"]
    assert imported["certification_id"] == cert["id"]
    serial = history.card_history_rows(run)[0]["serial"]
    assert {h["run_id"] for h in reg.serial_history(serial)} == {run_id, "run-2"}
    # idempotent
    again = reg.import_state_dir(state)
    assert again["certifications"] == 0 and again["certifications_existing"] == 2 and again["alerts"] == 0
    assert reg.status()["counts"]["card_results"] == n_cards * 2
    assert main(["registry", "import", str(state)]) == 0
    assert "0 certification(s) (2 already there)" in capsys.readouterr().out
    assert main(["registry", "import", str(tmp_path / "nowhere")]) == 2


def test_migration_0002_adds_card_utilization_to_a_0001_database(tmp_path):
    """A registry created at 0001 (no utilization column) upgrades in place; old rows read NULL."""
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config

    from mi300x_cert.registry import schema

    url = f"sqlite:///{tmp_path / 'old.db'}"
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(schema.__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url)
    eng = sa.create_engine(url)
    with eng.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    assert "utilization" not in {c["name"] for c in sa.inspect(eng).get_columns("card_results")}
    reg = Registry(url)  # SQLite upgrades itself on first open
    assert reg.revision() == "0002"
    assert "utilization" in {c["name"] for c in sa.inspect(reg.engine).get_columns("card_results")}
