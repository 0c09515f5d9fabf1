"""The embedded default object store: a moto S3 server on the loopback interface.

It is a real S3 HTTP endpoint (versioning, object lock and retention, SHA-256 checksums) that keeps
everything in memory: good for a laptop, a demo and tests, not for keeping certificates. Production
points ``MI300X_CERT_S3_ENDPOINT`` at real object storage.

    python -m mi300x_cert.s3local --port 9000     # prints its endpoint, runs until killed
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from .errors import StorageError

__all__ = ["LocalS3", "start", "main", "DEFAULT_PORT"]

DEFAULT_PORT = 9000


@dataclass
class LocalS3:
    """A running embedded S3 server."""

    host: str
    port: int
    _server: Any = field(repr=False, default=None)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def store(self, bucket: str = "mi300x-cert", **extra: Any) -> dict:
        """A store config dict for :func:`mi300x_cert.storage.publish_bundle` pointing here."""
        return {"endpoint": self.endpoint, "bucket": bucket, "access_key": "local", "secret_key": "local",
                "create_bucket": True, **extra}

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> "LocalS3":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start(port: int = 0, host: str = "127.0.0.1", log_requests: bool = False) -> LocalS3:
    """Start a moto S3 server in a daemon thread (``port=0``: a free port). Returns when it listens."""
    import logging

    # werkzeug logs every request at INFO on stderr; keep it for the command line only
    logging.getLogger("werkzeug").setLevel(logging.INFO if log_requests else logging.WARNING)
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:  # pragma: no cover - moto[server] is a pinned dependency
        raise StorageError("the embedded S3 server needs moto[server] installed") from e

    class _Server(ThreadedMotoServer):
        error: BaseException | None = None

        def _server_entry(self) -> None:  # the base class never signals a failed bind: do it here
            try:
                super()._server_entry()
            except BaseException as e:  # noqa: BLE001 - reported to start()
                self.error = e
                self._server_ready_event.set()

    server = _Server(ip_address=host, port=port, verbose=False)
    server.start()
    if server.error is not None:
        raise StorageError(f"embedded S3 server cannot listen on {host}:{port}: {server.error}") from server.error
    h, p = server.get_host_and_port()
    return LocalS3(host=host, port=int(p), _server=server)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mi300x_cert.s3local", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--quiet", action="store_true", help="do not log each request")
    args = ap.parse_args(argv)
    try:
        srv = start(args.port, args.host, log_requests=not args.quiet)
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(srv.endpoint, flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
