"""Fleet registry at scale: a synthetic registry of H hosts × R weekly certifications × C cards
(default 2,000 × 52 × 16 ≈ 1.66 M card rows), built by bulk insert, then the read paths timed.

    python bench/registry_scale.py                         # SQLite (temp file), then PostgreSQL
    python bench/registry_scale.py --backends sqlite --hosts 200
    python bench/registry_scale.py --out bench/results/registry-scale.json

PostgreSQL runs on a throw-away cluster on loopback (Debian's ``postgresql`` binaries, the helper
the tests use: ``tests/support/postgres.py``), or on ``--postgres-url``. Skipped with the reason
when neither is available.

Timed (median of ``--repeats`` warm runs, the first cold run reported apart):
``fleet()`` with the fleet file's hosts, ``serial_history()`` of random serials, ``list_serials()``,
one ``record_certification()`` of 16 cards (drift against the card's previous row and the SKU's
fleet median), ``list_alerts()`` and ``audit_expiry()`` over every host.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SKUS = [("mi300x", 0.5), ("h100", 0.3), ("h200", 0.2)]
START = dt.datetime(2025, 12, 1, 2, 0, tzinfo=dt.timezone.utc)


def _iso(d: dt.datetime) -> str:
    return d.isoformat(timespec="milliseconds")


def _sku(i: int) -> str:
    x = (i * 7919 % 1000) / 1000.0
    acc = 0.0
    for s, share in SKUS:
        acc += share
        if x < acc:
            return s
    return SKUS[-1][0]


def _executemany(conn, table, rows: list[dict]) -> None:
    """SQLite: one prepared INSERT, executemany (pysqlite's native loop)."""
    conn.execute(table.insert(), rows)


def _csv_value(v) -> str:
    if v is None:
        return ""  # unquoted empty = NULL in COPY … CSV
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, dict)):
        v = json.dumps(v)
    return '"' + str(v).replace('"', '""') + '"'


def _copy(conn, table, rows: list[dict]) -> None:
    """PostgreSQL: COPY … FROM STDIN (CSV), the server's bulk path."""
    import io

    cols = list(rows[0])
    buf = io.StringIO()
    for r in rows:
        buf.write(",".join(_csv_value(r[c]) for c in cols))
        buf.write("\n")
    buf.seek(0)
    quoted = ", ".join(f'"{c}"' for c in cols)
    cur = conn.connection.dbapi_connection.cursor()
    cur.copy_expert(f"COPY {table.name} ({quoted}) FROM STDIN WITH (FORMAT csv)", buf)
    cur.close()


def build(reg, hosts: int, runs: int, cards: int, chunk_hosts: int = 50, seed: int = 7) -> dict:
    """Bulk-insert the synthetic fleet; returns row counts and seconds per phase."""
    from sqlalchemy import func, select, text, update

    from mi300x_cert.registry import schema as s

    rng = random.Random(seed)
    t0 = time.perf_counter()
    cert_id = 0
    n_alerts = 0
    now = _iso(START + dt.timedelta(weeks=runs))
    for h0 in range(0, hosts, chunk_hosts):
        host_rows, cert_rows, card_rows, alert_rows, event_rows = [], [], [], [], []
        for h in range(h0, min(hosts, h0 + chunk_hosts)):
            name, sku = f"gpu-{h:05d}", _sku(h)
            host_rows.append({"name": name, "sku": sku, "profile": sku, "cards": cards, "valid_days": 8,
                              "first_seen": _iso(START), "last_seen": now})
            base_sd = {"mi300x": 1.30, "h100": 0.32, "h200": 0.22}[sku]
            for r in range(runs):
                cert_id += 1
                started = START + dt.timedelta(weeks=r, minutes=h % 600)
                finished = started + dt.timedelta(hours=2)
                ok = rng.random() > 0.05
                cert_rows.append({
                    "id": cert_id, "host": name, "run_id": f"scheduled__{_iso(started)}", "profile": sku, "sku": sku,
                    "path": "stock", "started": _iso(started), "finished": _iso(finished),
                    "registered_at": _iso(finished + dt.timedelta(minutes=1)),
                    "result": "CERTIFIED" if ok else "NOT CERTIFIED", "certified": ok,
                    "reasons": [] if ok else ["failed suites: thermal"],
                    "verdicts": {"latency": True, "thermal": ok, "network": True},
                    "bundle_uri": f"s3://certs/{name}/{r}", "bundle_digest": f"{cert_id:064x}",
                    "signer_keyid": f"{h:064x}", "trusted": True,
                    "expires_at": _iso(finished + dt.timedelta(days=8)) if ok else None,
                    "source": "register", "dag_id": f"recertify_{name}", "report": None, "data_docs": None})
                for c in range(cards):
                    card_rows.append({
                        "certification_id": cert_id, "host": name, "run_id": cert_rows[-1]["run_id"], "sku": sku,
                        "serial": f"{name}-SN{c:02d}", "card": c, "name": sku, "bus_id": f"0000:{c:02x}:00.0",
                        "date": _iso(started), "idle_junction_mean_c": 35 + rng.random() * 5,
                        "active_junction_p95_c": 70 + rng.random() * 10, "memory_max_c": 75 + rng.random() * 10,
                        "active_power_mean_w": 600 + rng.random() * 100,
                        "sd_per_image_median_s": base_sd * (1 + rng.random() * 0.04), "sd_batches": 3,
                        "card_ok": ok or c != 3, "failures": [] if ok or c != 3 else [{"suite": "thermal"}],
                        "drift": []})
                if not ok:
                    n_alerts += 1
                    aid = f"{started:%Y%m%dT%H%M%SZ}-{name}-thermal-{cert_id:010x}"
                    acked = r < runs - 2
                    alert_rows.append({
                        "id": aid, "host": name, "run_id": cert_rows[-1]["run_id"], "dag_id": f"recertify_{name}",
                        "suite": "thermal", "kind": "expectation", "severity": "error", "created": _iso(finished),
                        "message": "suite 'thermal' failed", "failures": [{"card": 3}], "report": None,
                        "data_docs": None, "bundle_uri": None, "certification_id": cert_id,
                        "status": "acknowledged" if acked else "open", "acknowledged_by": "ops" if acked else None,
                        "acknowledged_at": _iso(finished + dt.timedelta(hours=1)) if acked else None, "note": ""})
                    event_rows.append({"alert_id": aid, "action": "raised", "by": None, "at": _iso(finished),
                                       "note": ""})
        with reg.engine.begin() as conn:
            load = _copy if reg.dialect == "postgresql" else _executemany
            load(conn, s.hosts, host_rows)
            load(conn, s.certifications, cert_rows)
            load(conn, s.card_results, card_rows)
            if alert_rows:
                load(conn, s.alerts, alert_rows)
                load(conn, s.alert_events, event_rows)
    t_insert = time.perf_counter() - t0

    # the denormalised rows record_certification maintains one at a time
    t1 = time.perf_counter()
    cr, c = s.card_results, s.certifications
    with reg.engine.begin() as conn:
        latest = (select(cr.c.serial, func.max(cr.c.id).label("last_id"), func.count().label("runs"))
                  .where(cr.c.serial.is_not(None)).group_by(cr.c.serial).subquery())
        conn.execute(s.serials.insert().from_select(
            ["serial", "sku", "runs", "last_card_result_id", "last_date"],
            select(latest.c.serial, cr.c.sku, latest.c.runs, latest.c.last_id, cr.c.date)
            .join(cr, cr.c.id == latest.c.last_id)))
        last = select(func.max(c.c.id)).where(c.c.host == s.hosts.c.name).scalar_subquery()
        last_ok = select(func.max(c.c.id)).where(c.c.host == s.hosts.c.name, c.c.certified.is_(True)).scalar_subquery()
        conn.execute(update(s.hosts).values(last_certification_id=last, last_certified_id=last_ok))
        if reg.dialect == "postgresql":
            conn.execute(text("SELECT setval(pg_get_serial_sequence('certifications', 'id'), "
                              "(SELECT max(id) FROM certifications))"))
    with reg.engine.connect() as conn:  # planner statistics, as an operator's autovacuum / ANALYZE would have
        conn = conn.execution_options(isolation_level="AUTOCOMMIT") if reg.dialect == "postgresql" else conn
        conn.exec_driver_sql("ANALYZE")
        if reg.dialect == "sqlite":
            conn.commit()
    t_derived = time.perf_counter() - t1
    return {"method": "COPY FROM STDIN (CSV)" if reg.dialect == "postgresql" else "executemany INSERT",
            "insert_s": round(t_insert, 2), "derived_and_analyze_s": round(t_derived, 2),
            "build_s": round(t_insert + t_derived, 2), "certifications": cert_id, "card_rows": cert_id * cards,
            "alerts": n_alerts}


def _time(fn, repeats: int) -> dict:
    t = time.perf_counter()
    fn()
    cold = time.perf_counter() - t
    warm = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t)
    return {"cold_s": round(cold, 4), "median_s": round(statistics.median(warm), 4), "min_s": round(min(warm), 4),
            "max_s": round(max(warm), 4), "repeats": repeats}


def measure(reg, hosts: int, runs: int, cards: int, repeats: int, seed: int = 11) -> dict:
    rng = random.Random(seed)
    fleet_hosts = [{"name": f"gpu-{h:05d}", "sku": _sku(h), "valid_days": 8} for h in range(hosts)]
    now = _iso(START + dt.timedelta(weeks=runs - 1, days=3))
    out: dict = {}
    rows = reg.fleet(now=now, hosts=fleet_hosts)
    assert len(rows) == hosts
    out["fleet"] = _time(lambda: reg.fleet(now=now, hosts=fleet_hosts), repeats)
    serials = [f"gpu-{rng.randrange(hosts):05d}-SN{rng.randrange(cards):02d}" for _ in range(repeats + 1)]
    it = iter(serials * 2)
    n = len(reg.serial_history(serials[0]))
    assert n == runs, n
    out["serial_history"] = {**_time(lambda: reg.serial_history(next(it)), repeats), "rows": n}
    out["list_serials"] = {**_time(reg.list_serials, max(1, repeats // 3)), "rows": hosts * cards}
    out["list_alerts_open"] = _time(lambda: reg.list_alerts(), repeats)
    out["list_certifications_50"] = _time(lambda: reg.list_certifications(limit=50), repeats)
    # one new certification at scale (previous-row lookups + the SKU's fleet median)
    k = iter(range(10_000))

    def record():
        i = next(k)
        started = START + dt.timedelta(weeks=runs, hours=i)
        host = f"gpu-{i % hosts:05d}"
        reg.record_certification(
            {"host": host, "run_id": f"bench-{i}", "result": "CERTIFIED", "sku": _sku(i % hosts),
             "started": _iso(started), "finished": _iso(started + dt.timedelta(hours=2)), "bundle_digest": f"b{i}"},
            [{"serial": f"{host}-SN{c:02d}", "card": c, "date": _iso(started), "sd_per_image_median_s": 1.5,
              "active_junction_p95_c": 90.0, "memory_max_c": 80.0} for c in range(cards)], [])

    out["record_certification_16_cards"] = _time(record, max(1, repeats // 2))
    out["audit_expiry_all_hosts"] = _time(lambda: reg.audit_expiry(fleet_hosts, now=now), max(1, repeats // 3))
    return out


def _versions() -> dict:
    import alembic
    import sqlalchemy

    v = {"python": platform.python_version(), "sqlalchemy": sqlalchemy.__version__, "alembic": alembic.__version__}
    import sqlite3

    v["sqlite"] = sqlite3.sqlite_version
    try:
        import psycopg2

        v["psycopg2"] = psycopg2.__version__.split()[0]
    except ImportError:
        pass
    return v


def run_backend(name: str, url: str, args) -> dict:
    from sqlalchemy import text

    from mi300x_cert.registry import Registry

    print(f"[{name}] building {args.hosts} hosts × {args.runs} runs × {args.cards} cards …", flush=True)
    reg = Registry(url, auto_upgrade=True)
    built = build(reg, args.hosts, args.runs, args.cards)
    print(f"[{name}] built: {built}", flush=True)
    res = {"backend": name, "build": built, "timings": measure(reg, args.hosts, args.runs, args.cards, args.repeats)}
    with reg.engine.connect() as conn:
        if name == "postgresql":
            res["server_version"] = conn.execute(text("SHOW server_version")).scalar()
            res["database_bytes"] = conn.execute(text("SELECT pg_database_size(current_database())")).scalar()
    if name == "sqlite":
        p = Path(url.split("///", 1)[1])
        res["database_bytes"] = sum(f.stat().st_size for f in p.parent.glob(p.name + "*"))
    reg.close()
    for k, v in res["timings"].items():
        print(f"[{name}] {k}: median {v['median_s'] * 1000:.1f} ms (cold {v['cold_s'] * 1000:.1f} ms)", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=52, help="weekly certifications per host")
    ap.add_argument("--cards", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--postgres-url", help="an empty PostgreSQL database to use instead of a throw-away cluster")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    results = {"benchmark": "registry_scale", "when": _iso(dt.datetime.now(dt.timezone.utc)),
               "conditions": {"hosts": args.hosts, "runs_per_host": args.runs, "cards_per_run": args.cards,
                              "certifications": args.hosts * args.runs,
                              "card_rows": args.hosts * args.runs * args.cards, "repeats": args.repeats,
                              "cpu_cores": os.cpu_count(), "machine": platform.machine(),
                              "versions": _versions(), "command": "python bench/registry_scale.py " + " ".join(
                                  argv if argv is not None else sys.argv[1:])},
               "backends": [], "skipped": {}}
    results["conditions"]["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    tmp = Path(tempfile.mkdtemp(prefix="registry-scale-"))
    tmp.chmod(0o755)
    try:
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            if backend == "sqlite":
                results["backends"].append(run_backend("sqlite", f"sqlite:///{tmp / 'sqlite' / 'registry.db'}", args))
            elif backend == "postgresql":
                if args.postgres_url:
                    results["backends"].append(run_backend("postgresql", args.postgres_url, args))
                    continue
                from support.postgres import PG_MISSING, Postgres, pg_bindir

                bindir = pg_bindir()
                if bindir is None:
                    results["skipped"]["postgresql"] = PG_MISSING
                    print(f"[postgresql] skipped: {PG_MISSING}")
                    continue
                pg = Postgres(bindir, tmp / "pg")
                pg.start()
                try:
                    results["conditions"]["postgresql_settings"] = "fsync=off, full_page_writes=off, defaults otherwise"
                    results["backends"].append(run_backend("postgresql", pg.url, args))
                finally:
                    pg.stop()
            else:
                raise SystemExit(f"--backends: unknown backend {backend!r} (sqlite, postgresql)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["conditions"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"written: {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
