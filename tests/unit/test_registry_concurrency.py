"""The registry under concurrent writers, on SQLite (a file, WAL, BEGIN IMMEDIATE) and on
PostgreSQL (a throw-away cluster on loopback; skipped with the reason when the server binaries are
absent): records of two hosts at the same moment, 30 acknowledgements racing ``update_run_links``,
concurrent first open of an empty SQLite file, and the API end to end on each backend."""

from __future__ import annotations

import multiprocessing as mp
import threading
import uuid
from pathlib import Path

import pytest

from mi300x_cert.errors import RegistryConflict, RegistryError
from mi300x_cert.registry import Registry

CTX = mp.get_context("fork")
RUNS = 12
CARDS = 8


@pytest.fixture(scope="module")
def pg_cluster():
    from support.postgres import PG_MISSING, Postgres, pg_bindir

    bindir = pg_bindir()
    if bindir is None:
        pytest.skip(PG_MISSING)
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="registry-pg-"))  # not under pytest's 0700 dir: the server
    base.chmod(0o755)                                      # may run as the 'postgres' user
    pg = Postgres(bindir, base / "cluster")
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        u = f"sqlite:///{tmp_path / 'reg.db'}"
    else:
        pg = request.getfixturevalue("pg_cluster")
        u = pg.create_database(f"reg_{uuid.uuid4().hex[:12]}")
        with pytest.raises(RegistryError, match="registry upgrade"):
            Registry(u)  # a server database is never migrated implicitly
    Registry(u, auto_upgrade=True).close()
    return u


def _cert(host: str, i: int, **kw) -> dict:
    return {"host": host, "run_id": f"run-{i:03d}", "result": "CERTIFIED" if i % 3 else "NOT CERTIFIED",
            "sku": "mi300x", "started": f"2026-11-{1 + i % 28:02d}T00:00:00Z",
            "finished": f"2026-11-{1 + i % 28:02d}T0{1 + i // 28}:00:00Z", "bundle_digest": f"sha256:{host}:{i}", **kw}


def _cards(host: str, i: int) -> list[dict]:
    return [{"serial": f"{host}-SN{c}", "card": c, "date": f"2026-11-{1 + i % 28:02d}T00:00:00Z",
             "sd_per_image_median_s": 1.0 + 0.001 * i, "active_junction_p95_c": 60.0, "memory_max_c": 70.0}
            for c in range(CARDS)]


def _record_many(url: str, host: str, barrier, errors) -> None:
    try:
        reg = Registry(url)
        barrier.wait(timeout=60)
        for i in range(RUNS):
            reg.record_certification(_cert(host, i), _cards(host, i), [{"suite": "thermal", "card": 1}])
            reg.raise_alert(host=host, run_id=f"run-{i:03d}", suite="thermal", kind="expectation", message="m")
        reg.close()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        errors.put(f"{host}: {e!r}")
        raise


def test_two_processes_recording_two_hosts_at_once_lose_nothing(url):
    barrier, errors = CTX.Barrier(2), CTX.Queue()
    procs = [CTX.Process(target=_record_many, args=(url, h, barrier, errors)) for h in ("host-a", "host-b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert errors.empty(), errors.get()
    assert [p.exitcode for p in procs] == [0, 0]
    reg = Registry(url)
    counts = reg.status()["counts"]
    assert counts["certifications"] == 2 * RUNS and counts["card_results"] == 2 * RUNS * CARDS
    assert counts["failed_expectations"] == 2 * RUNS and counts["alerts"] == 2 * RUNS
    assert counts["serials"] == 2 * CARDS
    assert all(s["runs"] == RUNS for s in reg.list_serials())
    fleet = {r["host"]: r for r in reg.fleet()}
    newest = max(range(RUNS), key=lambda i: (_cert("x", i)["finished"], i))
    assert fleet["host-a"]["run_id"] == fleet["host-b"]["run_id"] == f"run-{newest:03d}"
    assert fleet["host-a"]["open_alerts"] == RUNS
    reg.close()


def _ack_some(url: str, ids: list[str], barrier, errors) -> None:
    try:
        reg = Registry(url)
        barrier.wait(timeout=60)
        threads = [threading.Thread(target=lambda a=a: reg.acknowledge(a, by=f"op-{a[-4:]}", note="racing"))
                   for a in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        reg.close()
    except BaseException as e:  # noqa: BLE001
        errors.put(repr(e))
        raise


def _links_loop(url: str, barrier, errors) -> None:
    try:
        reg = Registry(url)
        barrier.wait(timeout=60)
        for i in range(40):
            reg.update_run_links("h1", "r1", report=f"/report-{i}.html", bundle_uri=f"s3://b/{i}",
                                 data_docs="/dd.html")
        reg.close()
    except BaseException as e:  # noqa: BLE001
        errors.put(repr(e))
        raise


def test_thirty_acknowledgements_racing_update_run_links_all_land(url):
    reg = Registry(url)
    ids = [reg.raise_alert(host="h1", run_id="r1", suite=f"suite{i:02d}", kind="expectation", message="m")[0]["id"]
           for i in range(30)]
    barrier, errors = CTX.Barrier(4), CTX.Queue()
    procs = [CTX.Process(target=_ack_some, args=(url, ids[k::3], barrier, errors)) for k in range(3)]
    procs.append(CTX.Process(target=_links_loop, args=(url, barrier, errors)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert errors.empty(), errors.get()
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    alerts = reg.list_alerts(include_acknowledged=True)
    assert len(alerts) == 30
    assert reg.list_alerts() == [], "an acknowledgement was lost"
    for a in alerts:
        assert a["acknowledged_by"] == f"op-{a['id'][-4:]}" and a["note"] == "racing"
        assert a["report"] == "/report-39.html" and a["bundle_uri"] == "s3://b/39"
        actions = [e["action"] for e in a["events"]]
        assert actions.count("acknowledged") == 1 and actions.count("links") == 40
    reg.close()


def _open(path: str, q) -> None:
    try:
        q.put(Registry(path).revision())
    except BaseException as e:  # noqa: BLE001
        q.put(repr(e))


def test_concurrent_first_open_of_an_empty_sqlite_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh' / 'registry.db'}"
    q = CTX.Queue()
    procs = [CTX.Process(target=_open, args=(url, q)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert sorted(q.get(timeout=5) for _ in procs) == ["0002"] * 4


def test_api_end_to_end_on_each_backend(url):
    reg = Registry(url)
    cert, created = reg.record_certification(_cert("h1", 1), _cards("h1", 1), [])
    assert created and len(cert["cards"]) == CARDS
    assert reg.record_certification(_cert("h1", 1), _cards("h1", 1), [])[1] is False
    with pytest.raises(RegistryConflict):
        reg.record_certification(_cert("h1", 1, bundle_digest="sha256:else"), [], [])
    later = _cert("h1", 2, started="2026-11-20T00:00:00Z", finished="2026-11-20T01:00:00Z")
    cards = _cards("h1", 2)
    for c in cards:
        c.update(date="2026-11-20T00:00:00Z", memory_max_c=80.0)
    cert2, _ = reg.record_certification(later, cards, [])
    assert {f["metric"] for f in cert2["drift"]} == {"memory_max_c"}
    assert [h["run_id"] for h in reg.serial_history("h1-SN0")] == ["run-001", "run-002"]
    a, _ = reg.raise_alert(host="h1", run_id="run-002", suite="thermal", kind="expectation", message="m")
    reg.acknowledge(a["id"], by="ops")
    assert reg.update_run_links("h1", "run-002", report="/r") == 1
    assert reg.get_alert(a["id"])["status"] == "acknowledged"
    rows = reg.fleet(now="2026-11-21T00:00:00Z", hosts=[{"name": "h1"}, {"name": "h9"}])
    assert [(r["host"], r["status"]) for r in rows] == [("h1", "certified"), ("h9", "never_certified")]
    assert {x["kind"] for x in reg.audit_expiry([{"name": "h9"}])} == {"never_certified"}
    assert reg.list_certifications(limit=1)[0]["run_id"] == "run-002"
    reg.close()


def test_postgres_helper_is_shared():
    import support.postgres as helper

    assert Path(helper.__file__).parent.name == "support" and hasattr(helper, "Postgres")
