"""``mi300x-cert`` command line. Every subcommand is one call into :mod:`mi300x_cert.pipeline`
(or a sibling module), the same functions the Airflow DAGs call.

Exit codes: 0 success / certified, 1 an expectation failed, 2 a CertError (bad input, missing
file, unreachable store, failed verification) or an interruption, 3 an unexpected bug.

SIGTERM (how Airflow, systemd and ``kill`` stop a process) is handled like Ctrl-C (SIGINT): the
running case stops, its workers are killed, the case and the run are marked failed
("interrupted"), and the command exits 2. A second signal while that cleanup runs is ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Iterator

from . import __version__
from .errors import EXIT_BUG, EXIT_ERROR, EXIT_FAILED_EXPECTATION, EXIT_OK, CertError

__all__ = ["main", "build_parser", "verify_summary", "EXPERIMENTS"]

from .experiments import EXPERIMENTS as _REGISTERED

EXPERIMENTS = list(_REGISTERED)  # the experiment registry (mi300x_cert.experiments)


def _print(obj) -> None:
    if isinstance(obj, (dict, list)):
        print(json.dumps(obj, indent=2, default=str))
    else:
        print(obj)


def cmd_profiles(args) -> int:
    from .config import list_profiles, load_profile

    bad = 0
    paths = [Path(p) for p in args.check] if args.check else list_profiles()
    for p in paths:
        try:
            prof = load_profile(p)
            from .experiments import get_experiment

            exps = [n for n in EXPERIMENTS if get_experiment(n).enabled(prof)]
            from .validation import expectations_dir

            thr = prof.thresholds_set
            have = (expectations_dir() / "params" / f"{thr}.yaml").is_file()
            thr_txt = thr if have else f"{thr} (none yet: `run` works, `certify` is refused until `baseline` makes it)"
            print(f"ok    {p.stem:<12} sku={prof.sku:<8} path={prof.path:<9} backend={prof.telemetry.backend:<9} "
                  f"cards={len(prof.host.card_ids):<3} experiments={','.join(exps)} thresholds={thr_txt}")
        except CertError as e:
            bad += 1
            print(f"ERROR {e}", file=sys.stderr)
    return EXIT_ERROR if bad else EXIT_OK


def cmd_inventory(args) -> int:
    from .inventory import collect_inventory
    from .config import load_profile

    prof = load_profile(args.profile)
    _print(collect_inventory(prof))
    return EXIT_OK


def _run_or_resume(args, command: str) -> dict:
    """``--resume DIR`` finishes a run in place; otherwise ``--profile`` and ``--out`` start a new one."""
    from .experiments import prepare_and_run, resume_run

    experiment = getattr(args, "experiment", None) or "all"
    if args.resume:
        extra = [flag for flag, v in (("--profile", args.profile), ("--out", args.out), ("--run-id", args.run_id)) if v]
        if extra:
            raise CertError(f"{command} --resume DIR continues the run in DIR with its stored profile; "
                         f"leave out {', '.join(extra)}")
        if experiment != "all":
            raise CertError(f"{command} --resume DIR finishes every experiment the run planned; "
                         f"leave out {experiment!r} (or write 'all')")
        print(f"resuming run directory: {args.resume}", file=sys.stderr)
        return resume_run(args.resume, EXPERIMENTS, progress=not args.quiet, wait_s=args.wait)
    missing = [flag for flag, v in (("--profile", args.profile), ("--out", args.out)) if not v]
    if missing:
        raise CertError(f"{command} needs {' and '.join(missing)} (or --resume DIR to finish an interrupted run)")
    names = EXPERIMENTS if experiment == "all" else [experiment]
    # a run of one experiment disables the others in the run's profile, so the run can be complete
    overrides = None if experiment == "all" else {
        "experiments": {n: {"enabled": False} for n in EXPERIMENTS if n not in names}}
    # measuring needs no thresholds set (a reference run calibrates one); validate/certify do
    return prepare_and_run(args.profile, args.out, names, overrides=overrides, run_id=args.run_id,
                           progress=not args.quiet, wait_s=args.wait, require_thresholds=False)


def cmd_run(args) -> int:
    result = _run_or_resume(args, "run")
    run_dir = result.get("run_dir")
    _print(result)
    if result.get("state") == "complete":
        print(f"run complete: {run_dir}", file=sys.stderr)
        return EXIT_OK
    print(f"error: run {result.get('state')}: {result.get('error')}", file=sys.stderr)
    return EXIT_ERROR


def cmd_finalize(args) -> int:
    from . import pipeline

    out = pipeline.refinalize_run(args.run_dir, args.experiments or None)
    for name, info in out["experiments"].items():
        print(f"{name}: {info['state']}; tables {', '.join(info['tables'])}", file=sys.stderr)
    _print(out)
    return EXIT_OK


def cmd_baseline(args) -> int:
    from .validation.baseline import baseline

    out = baseline(args.run_dirs, args.out, policy=args.policy, set_name=args.set_name)
    print(f"thresholds set {out['set']} from {len(out['runs'])} run(s) written to {out['out']}", file=sys.stderr)
    _print(out)
    return EXIT_OK


def cmd_validate(args) -> int:
    from . import pipeline

    verdict = pipeline.validate(args.run_dir, args.suite)
    from .validation import format_verdict

    print(format_verdict(verdict))
    return EXIT_OK if verdict["success"] else EXIT_FAILED_EXPECTATION


def cmd_report(args) -> int:
    from . import pipeline

    print(pipeline.report(args.run_dir))
    return EXIT_OK


def cmd_sign(args) -> int:
    from . import pipeline

    bundle = pipeline.sign(args.run_dir, key=args.key)
    print(bundle)
    try:  # say what was signed: a bundle of an unvalidated or failed run certifies nothing
        pred = json.loads((Path(bundle) / "statement.json").read_text())["predicate"]
        note = ((pred.get("certification") or {}).get("verdict") or {}).get("note")
        dev = ((pred.get("bundle") or {}).get("signer") or {}).get("development_key")
        print(f"signed: result {pred.get('result')}" + (f" ({note})" if note else "")
              + ("; development key: not a production certificate" if dev else ""), file=sys.stderr)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return EXIT_OK


def cmd_publish(args) -> int:
    from . import pipeline

    print(pipeline.publish(args.bundle_dir))
    return EXIT_OK


def cmd_verify(args) -> int:
    from . import pipeline

    result = pipeline.verify(args.target, key=args.key, trust=not args.integrity_only)
    _print(result)
    print(verify_summary(result), file=sys.stderr)
    if args.integrity_only:  # only: is every byte the one that was signed (and where it was signed for)?
        return EXIT_OK
    if not result.get("trusted"):
        return EXIT_ERROR
    return EXIT_OK if (result.get("decision") or {}).get("certified") else EXIT_FAILED_EXPECTATION


def verify_summary(result: dict) -> str:
    """One line: the bundle is intact (signer, trust) and what it certifies, as decided by
    :func:`mi300x_cert.outcome.decide` (complete run, every suite passed, signed, trusted signer)."""
    key = "development key" if result.get("development_key") else f"key {str(result.get('keyid'))[:16]}"
    if result.get("trusted") is None:
        trust = "trust not checked (--integrity-only)"
    elif result.get("trusted"):
        trust = f"trusted ({result.get('trust_source')})"
    else:
        trust = f"NOT a trusted key: {result.get('trust_reason') or 'unknown signer'}"
    d = result.get("decision") or {}
    if d.get("certified"):
        what = f"CERTIFIED (result {result.get('result')})"
    else:
        what = (f"NOT CERTIFIED (result {result.get('result')}"
                + (f"; failed: {', '.join(map(str, result['failed_tests'][:8]))}" if result.get("failed_tests") else "")
                + (f"; {'; '.join(d.get('reasons') or [])}" if d.get("reasons") else "") + ")")
    return (f"verified: signature and {result.get('artifacts')} artifact digests OK ({key}, {trust}); "
            f"host {result.get('host')} run {result.get('run_id')}: {what}")


def cmd_register(args) -> int:
    from .register import conclude

    outcome = conclude(bundle=args.target, host=args.host, run_id=args.run_id, source="register")
    if args.json:
        _print(outcome)
    else:
        state = "refused, " if outcome.get("refused") else ""
        print(f"{outcome['host']} run {outcome['run_id']}: {state}{outcome['result']}"
              + (f" ({'; '.join(outcome['reasons'])})" if outcome["reasons"] else "")
              + ("" if outcome.get("created") or outcome.get("refused") else " — already registered, nothing changed"))
        for a in outcome.get("alerts") or []:
            print(f"  alert {a.get('id')}: {a.get('kind')} {a.get('suite')}")
    return EXIT_OK if outcome["certified"] else EXIT_FAILED_EXPECTATION


def cmd_certify(args) -> int:
    from .certify import certify

    outcome = certify(args.profile, args.out, run_id=args.run_id, progress=not args.quiet,
                      publish=not args.no_publish, resume=args.resume, wait_s=args.wait)
    return EXIT_OK if outcome["certified"] else EXIT_FAILED_EXPECTATION


def _registry(args):
    from .registry import open_registry

    return open_registry(getattr(args, "registry", None))


def _fleet_file(args):
    """The fleet file for fleet/audit views: --fleet FILE, else $MI300X_CERT_FLEET / include/fleet.yaml
    when it exists (an explicit --fleet that is missing or broken is an error)."""
    from .fleet import fleet_path, load_fleet

    if getattr(args, "fleet", None):
        return load_fleet(args.fleet)
    return load_fleet() if fleet_path().is_file() else None


def cmd_alerts(args) -> int:
    from .registry.text import format_alerts

    reg = _registry(args)
    by = args.by or os.environ.get("USER", "operator")
    if args.ack or args.reopen:
        a = reg.acknowledge(args.ack, by=by, note=args.note or "") if args.ack else \
            reg.reopen(args.reopen, by=by, note=args.note or "")
        print(json.dumps(a, indent=2, default=str) if args.json else format_alerts([a], True))
        return EXIT_OK
    rows = reg.list_alerts(include_acknowledged=args.all, host=args.host)
    print(json.dumps(rows, indent=2, default=str) if args.json else format_alerts(rows, args.all))
    return EXIT_OK


def cmd_history(args) -> int:
    from .history import cli_history, format_history, format_serials

    if args.index:  # a JSON-lines index written by an older version
        return cli_history(args.serial, args.index, as_json=args.json)
    reg = _registry(args)
    rows = reg.serial_history(args.serial) if args.serial else reg.list_serials()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(format_history(rows) if args.serial else format_serials(rows))
    return EXIT_OK


def cmd_fleet(args) -> int:
    from .registry.text import format_fleet

    fleet = _fleet_file(args)
    rows = _registry(args).fleet(hosts=fleet.registry_hosts() if fleet else None)
    print(json.dumps(rows, indent=2, default=str) if args.json else format_fleet(rows))
    return EXIT_OK


def cmd_registry(args) -> int:
    from .registry import Registry
    from .registry.text import format_alerts, format_import, format_status

    if args.action in ("upgrade", "status"):
        if args.action == "upgrade" and args.create_database:
            from .registry.core import create_database
            from .registry.url import registry_url

            if create_database(args.registry or registry_url()):
                print("created the registry database", file=sys.stderr)
        reg = Registry(args.registry, auto_upgrade=False, check_schema=False)
        try:
            st = reg.upgrade() if args.action == "upgrade" else reg.status()
        finally:
            reg.close()
        print(json.dumps(st, indent=2) if args.json else format_status(st))
        return EXIT_OK if st["up_to_date"] else EXIT_ERROR
    if args.action == "import":
        if not args.state_dir:
            raise CertError("registry import needs STATE_DIR (the directory holding alerts/, outcomes/, history/)")
        res = _registry(args).import_state_dir(args.state_dir)
        print(json.dumps(res, indent=2, default=str) if args.json else format_import(res))
        return EXIT_OK
    # audit
    fleet = _fleet_file(args)
    if fleet is None:
        raise CertError("registry audit needs a fleet file (--fleet FILE or $MI300X_CERT_FLEET)")
    rows = _registry(args).audit_expiry(fleet.registry_hosts())
    print(json.dumps(rows, indent=2, default=str) if args.json else format_alerts(rows, False))
    return EXIT_OK


def cmd_keys(args) -> int:
    from .registry.text import format_keys

    if args.action == "generate":  # on the GPU host: no registry involved, the private key stays here
        from .bundle.keys import generate_host_key

        k = generate_host_key(args.out, force=args.force)
        if args.json:
            print(json.dumps(k, indent=2))
        else:
            print(f"host signing key {k['path']} (keyid {k['keyid']})\npublic key {k['public_path']}\n"
                  f"enroll it on the control plane: mi300x-cert keys enroll <host> --public-key {Path(k['public_path']).name}")
        return EXIT_OK
    reg = _registry(args)
    by = getattr(args, "by", None) or os.environ.get("USER", "operator")
    if args.action == "enroll":
        try:
            pem = sys.stdin.buffer.read() if args.public_key == "-" else Path(args.public_key).read_bytes()
        except OSError as e:
            raise CertError(f"--public-key {args.public_key}: cannot be read: {e.strerror or e}") from None
        k = reg.enroll_key(args.host, pem, by=by, note=args.note or "")
        print(json.dumps(k, indent=2) if args.json else f"enrolled key {k['keyid']} for host {k['host']}")
        return EXIT_OK
    if args.action == "revoke":
        k = reg.revoke_key(args.keyid, by=by, reason=args.reason or "")
        print(json.dumps(k, indent=2) if args.json else
              f"revoked key {k['keyid']} of host {k['host']} at {k['revoked_at']} by {k['revoked_by']}")
        return EXIT_OK
    rows = reg.list_keys(host=args.host)
    print(json.dumps(rows, indent=2) if args.json else format_keys(rows))
    return EXIT_OK


def cmd_airflow_smoke(args) -> int:
    from .airflow_local import cli_smoke

    return cli_smoke(args.home, args.out, args.hot_card, as_json=args.json)


def cmd_airflow_standalone(args) -> int:
    from .airflow_local import cli_standalone

    return cli_standalone(args.home, args.port)


def cmd_bench(args) -> int:
    """A thin hook: the bench is developer tooling that lives in the checkout's ``bench/`` (the
    installed package never imports it). Outside a checkout it says how to get it."""
    import importlib

    from .config import REPO_ROOT

    if not (REPO_ROOT / "bench" / "cli.py").is_file():
        raise CertError("mi300x-cert bench is developer tooling of the repository checkout (bench/cli.py); "
                        "run it from a checkout: python -m bench.cli --help")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("bench.cli").main(args.rest)


def _wait_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more seconds")
    return value


def _lock_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--resume", metavar="DIR", help="finish the interrupted run in DIR: cases already done are kept, "
                                                   "the rest run (no --profile/--out)")
    s.add_argument("--wait", type=_wait_seconds, metavar="SECONDS",
                   help="when another run measures on this host, wait this long for it, then refuse naming it "
                        "(default $MI300X_CERT_LOCK_WAIT_S, else 120; 0 refuses at once)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mi300x-cert", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"mi300x-cert {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("profiles", help="list profiles and check them")
    s.add_argument("check", nargs="*", help="profile files to check (default: every include/profiles/*.yaml)")
    s.set_defaults(func=cmd_profiles)

    s = sub.add_parser("inventory", help="host, cards, serials, drivers and library versions")
    s.add_argument("--profile", default="smoke")
    s.set_defaults(func=cmd_inventory)

    s = sub.add_parser("run", help="run one experiment or all into a new run directory (or --resume one)")
    s.add_argument("experiment", nargs="?", choices=EXPERIMENTS + ["all"], help="default with --resume: all")
    s.add_argument("--profile")
    s.add_argument("--out", help="new run directory")
    s.add_argument("--run-id")
    _lock_args(s)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("finalize", help="compute a finished run's stats/ tables again from its rows and streams "
                                        "(no measuring): a run finalized by an earlier version gets today's tables")
    s.add_argument("run_dir")
    s.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                   help=f"default: every enabled one ({', '.join(EXPERIMENTS)})")
    s.set_defaults(func=cmd_finalize)

    s = sub.add_parser("validate", help="run the Great Expectations suites on a run directory")
    s.add_argument("run_dir")
    from .experiments import suite_names

    s.add_argument("--suite", help=f"one suite ({', '.join(suite_names())}); default all")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("baseline", help="derive a thresholds set (params file) from reference runs")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="complete reference runs of one profile")
    s.add_argument("--out", required=True, help="params file to write (e.g. expectations/params/h200.yaml)")
    s.add_argument("--policy", help="params file whose limits of policy (throttle events, sensor readability, "
                                    "recovery margin, network bounds) are copied; default: built-in values")
    s.add_argument("--set", dest="set_name", help="set name (default: the runs' <sku> or <sku>-<path>)")
    s.set_defaults(func=cmd_baseline)

    s = sub.add_parser("report", help="figures, tables and verdicts as one HTML page")
    s.add_argument("run_dir")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("sign", help="build the signed bundle of a validated run")
    s.add_argument("run_dir")
    s.add_argument("--key", help="private key PEM (default: configured key, else the local development key)")
    s.set_defaults(func=cmd_sign)

    s = sub.add_parser("publish", help="upload a bundle to S3")
    s.add_argument("bundle_dir")
    s.set_defaults(func=cmd_publish)

    s = sub.add_parser("verify", help="check a bundle's signature, digests, location and signer (dir or s3://…)",
                       description="Exit 0: intact, trusted signer, CERTIFIED; 1: intact and trusted but NOT "
                                   "CERTIFIED; 2: tampered, replayed (s3:// location differs from its statement) "
                                   "or signer not trusted (not enrolled for the host, revoked).")
    s.add_argument("target")
    s.add_argument("--key", help="public key PEM to check the signature with (pins the signer)")
    s.add_argument("--integrity-only", action="store_true",
                   help="check only that every byte is the one signed (and, for s3://, its location); "
                        "do not ask whether the signer is trusted")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("register", help="control plane: verify a published bundle against the enrolled key, "
                                        "decide, record the certification and its alerts")
    s.add_argument("target", metavar="BUNDLE_DIR|s3://…")
    s.add_argument("--host", help="the host being concluded (a bundle naming another host is refused)")
    s.add_argument("--run-id", help="the run being concluded (a bundle naming another run is refused)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_register)

    s = sub.add_parser("certify", help="run → validate → report → sign → publish")
    s.add_argument("--profile")
    s.add_argument("--out")
    s.add_argument("--run-id")
    _lock_args(s)
    s.add_argument("--no-publish", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_certify)

    reg = argparse.ArgumentParser(add_help=False)
    reg.add_argument("--registry", metavar="URL",
                     help="registry database URL (default $MI300X_CERT_REGISTRY_URL, the Airflow connection "
                          "mi300x_cert_registry, else SQLite in the state dir)")

    s = sub.add_parser("alerts", parents=[reg], help="list, acknowledge or reopen alerts (fleet registry)")
    s.add_argument("--all", action="store_true", help="include acknowledged alerts")
    s.add_argument("--host", help="only this host's alerts")
    s.add_argument("--ack", metavar="ALERT_ID")
    s.add_argument("--reopen", metavar="ALERT_ID")
    s.add_argument("--by", help="who acknowledges / reopens (default $USER)")
    s.add_argument("--note")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_alerts)

    s = sub.add_parser("history", parents=[reg],
                       help="certifications of one GPU by serial, with drift flags (no SERIAL: the serials known)")
    s.add_argument("serial", nargs="?", metavar="SERIAL")
    s.add_argument("--index", metavar="DIR", help="read a JSON-lines history index instead of the registry")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_history)

    s = sub.add_parser("fleet", parents=[reg], help="one line per host: last result, age, expiry, open alerts")
    s.add_argument("--fleet", metavar="FILE", help="fleet file (default $MI300X_CERT_FLEET or include/fleet.yaml)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_fleet)

    s = sub.add_parser("registry", parents=[reg], help="the fleet registry database: upgrade, status, import, audit")
    s.add_argument("action", choices=["upgrade", "status", "import", "audit"],
                   help="upgrade: apply schema migrations; status: URL, revision, row counts; import STATE_DIR: "
                        "bring in a state directory's alerts/outcomes/history files; audit: raise expiry alerts")
    s.add_argument("state_dir", nargs="?", metavar="STATE_DIR", help="for import")
    s.add_argument("--fleet", metavar="FILE", help="fleet file for audit")
    s.add_argument("--create-database", action="store_true",
                   help="upgrade: first create the PostgreSQL database when it does not exist")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_registry)

    s = sub.add_parser("keys", help="bundle-signing keys of the hosts: generate (on a host), enroll, list, revoke")
    ksub = s.add_subparsers(dest="action", required=True)
    k = ksub.add_parser("generate", help="on a GPU host: make its own signing key (the private key never leaves it)")
    k.add_argument("--out", metavar="FILE", help="private key path (default <MI300X_CERT_HOME_DIR>/host-signing-key.pem)")
    k.add_argument("--force", action="store_true", help="replace an existing key (rotation: enroll the new one)")
    k.add_argument("--json", action="store_true")
    k = ksub.add_parser("enroll", parents=[reg], help="trust a host's public key")
    k.add_argument("host")
    k.add_argument("--public-key", required=True, metavar="FILE",
                   help="PEM public key (host-signing-key.pub.pem from 'keys generate'; - reads standard input)")
    k.add_argument("--by", help="who enrolls it (default $USER)")
    k.add_argument("--note")
    k.add_argument("--json", action="store_true")
    k = ksub.add_parser("list", parents=[reg], help="enrolled keys")
    k.add_argument("--host")
    k.add_argument("--json", action="store_true")
    k = ksub.add_parser("revoke", parents=[reg], help="stop trusting a key")
    k.add_argument("keyid")
    k.add_argument("--reason")
    k.add_argument("--by", help="who revokes it (default $USER)")
    k.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_keys)

    s = sub.add_parser("airflow-smoke", help="run the smoke recertification DAG in a local Airflow home (dag.test)")
    s.add_argument("--home", help="AIRFLOW_HOME to create or reuse (default ./.airflow)")
    s.add_argument("--out", help="directory for run directories (default <home>/mi300x-cert/runs)")
    s.add_argument("--hot-card", type=int, metavar="N", help="make simulated card N run hot (the thermal suite fails)")
    s.add_argument("--json", action="store_true", help="print the whole result as JSON")
    s.set_defaults(func=cmd_airflow_smoke)

    s = sub.add_parser("airflow-standalone", help="airflow standalone with this project's DAGs, plugin and a local S3")
    s.add_argument("--home", help="AIRFLOW_HOME (default ./.airflow)")
    s.add_argument("--port", type=int, default=8080)
    s.set_defaults(func=cmd_airflow_standalone)

    s = sub.add_parser("bench", help="stock vs compile recipe vs optimized workloads on a GPU (checkout only: bench/cli.py)")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_bench)
    return p


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (named after the signal) once; later signals are
    ignored so the cleanup they started (killing workers, marking the run failed) can finish.
    Previous handlers come back on exit. Only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[str] = []

    def handler(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if fired:
            print(f"{name}: still cleaning up after {fired[0]}", file=sys.stderr, flush=True)
            return
        fired.append(name)
        raise KeyboardInterrupt(name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:
        # bench has its own option parser: hand it everything after the subcommand
        # (argparse's REMAINDER drops options that start with "--" after a subcommand).
        args = parser.parse_args(["bench"])
        args.rest = argv[1:]
    else:
        args = parser.parse_args(argv)
    try:
        with _interruptible():
            return int(args.func(args) or 0)
    except CertError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'SIGINT'})", file=sys.stderr)
        return EXIT_ERROR
    except Exception:  # a bug, not a user error
        traceback.print_exc()
        return EXIT_BUG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
