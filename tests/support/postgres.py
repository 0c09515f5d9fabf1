"""A throw-away PostgreSQL cluster for tests: Debian's ``postgresql`` binaries, a temp data dir,
loopback TCP on a free port, trust authentication, fsync off. As root it runs the server as the
packaged ``postgres`` user (or ``nobody``): postgres refuses to run as root.

    bindir = pg_bindir()          # None when the binaries are absent: skip with PG_MISSING
    pg = Postgres(bindir, tmp)    # .start() / .url / .create_database(name) / .stop()
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
from pathlib import Path

__all__ = ["PG_MISSING", "free_port", "pg_bindir", "Postgres"]

PG_MISSING = "PostgreSQL server binaries not found: apt-get install -y postgresql"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir() -> Path | None:
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    for c in reversed(cands):
        if (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and shutil.which("initdb") else None


class Postgres:
    """A throw-away PostgreSQL cluster: temp data dir, loopback TCP on a free port, socket in the temp dir."""

    def __init__(self, bindir: Path, base: Path) -> None:
        self.bindir = bindir
        self.base = base
        self.data = base / "pgdata"
        self.sock = base / "pgsock"
        self.log = base / "postgres.log"
        self.port = free_port()
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            # postgres refuses to run as root: run it as the packaged 'postgres' user (or nobody)
            user = "postgres"
            try:
                import pwd

                pwd.getpwnam(user)
            except KeyError:
                user = "nobody"
            self._prefix = ["runuser", "-u", user, "--"]
            self.user = user
        else:
            self.user = None

    def _run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self._prefix + argv, check=True, capture_output=True, text=True, timeout=120, **kw)

    def start(self) -> "Postgres":
        self.base.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if self.user:
            import pwd

            pw = pwd.getpwnam(self.user)
            os.chmod(self.base, 0o755)
            for p in (self.sock,):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            self.data.mkdir(exist_ok=True)
            os.chown(self.data, pw.pw_uid, pw.pw_gid)
            self.log.touch()
            os.chown(self.log, pw.pw_uid, pw.pw_gid)
        self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "airflow", "-E", "UTF8", "--no-sync"])
        opts = f"-p {self.port} -k {self.sock} -h 127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=200"
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start"])
        self.create_database("airflow")
        return self

    def create_database(self, name: str) -> str:
        """A new empty database on the cluster; returns its URL."""
        self._run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "airflow", name])
        return self.url_for(name)

    def url_for(self, name: str) -> str:
        return f"postgresql+psycopg2://airflow@127.0.0.1:{self.port}/{name}"

    @property
    def url(self) -> str:
        return self.url_for("airflow")

    def stop(self) -> None:
        try:
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        except Exception:  # noqa: BLE001 - teardown best effort
            pass
