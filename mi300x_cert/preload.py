"""Workers forked from a preloaded process: the libraries are imported once per experiment, not once
per worker.

A workload worker spends most of its start importing torch, diffusers and transformers (≈ 7 s of
CPU each time on a small machine; a bare-metal case of 4 cards pays it 4 times). For **CPU workers
of model workloads** (the simulated cards of the smoke profile and of every test) the launcher
starts one **preloader** — ``python -m mi300x_cert.preload`` under the same network-isolation
prefix and environment as the workers — that imports what the cases' workload kinds need
(``Workload.PRELOAD``) and then forks one worker per request. Each forked worker

* gets its own stdin, stdout and stderr (passed over a private Unix socket), its own session and
  process group (the launcher kills it and anything it started together, as before), and the
  environment ``pin_env`` gives it (card pins, thread counts, offline flags);
* then runs exactly :func:`mi300x_cert.worker.main`, the protocol of a spawned worker.

The preloader runs with one thread per math library and counts GPUs through NVML
(``PYTORCH_NVML_BASED_CUDA_CHECK``), and before it forks anything it checks that its imports left
exactly one thread and no initialized GPU driver (a probe child asks torch whether it is a bad
fork). If not — on a GPU host NVML leaves a thread behind — it refuses, and the workers are
spawned. **GPU workers are always spawned**: their libraries leave threads and driver state that a
fork does not carry safely, and their cases run for minutes, so the import is not worth saving.

The preloader answers each request with the worker's pid and reports each worker's exit status
(as ``subprocess.Popen`` gives it: negative for a signal). It ends when the launcher closes the
socket (also when the launcher dies). A preloader that cannot start (an import fails, it refuses,
it does not answer within the load timeout) is not fatal: the launcher spawns the workers instead
and records why (``WorkerResult.start``). ``MI300X_CERT_WORKER_START=spawn`` always spawns.

Within :func:`preloading` (``run_experiment`` holds it for its cases when they have more than one
worker in all) one preloader serves every
case of the same isolation prefix, kinds and base environment; outside it, a launch of two or more
workers starts its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

from .errors import WorkerError

__all__ = ["START_MODES", "start_mode", "Preloader", "ForkedProcess", "preloading", "active_pool",
           "preload_kinds", "preloader_env", "host_refusal"]

START_MODES = ("preload", "spawn")
_ENV = "MI300X_CERT_WORKER_START"
# thread settings differ from case to case (cores / processes); the worker applies its own
_PER_WORKER = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "MI300X_CERT_VIRTUAL_CARD",
               "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MI300X_CERT_CPU_THREADS")


def start_mode(env: dict | None = None) -> str:
    """``preload`` (default) or ``spawn``, from ``MI300X_CERT_WORKER_START``; anything else is a
    WorkerError naming the variable and the allowed values."""
    raw = (os.environ if env is None else env).get(_ENV, "").strip().lower() or "preload"
    if raw not in START_MODES:
        raise WorkerError(f"{_ENV}={raw!r}: expected one of {', '.join(START_MODES)}")
    return raw


def preload_kinds(kinds: list[str] | tuple[str, ...]) -> list[str]:
    """Import what the workload kinds need (each class's ``PRELOAD`` list of ``module`` or
    ``module:name,name`` entries; names of lazy packages are resolved, which imports them).
    Returns the entries imported. Touches no device."""
    import importlib

    from .workloads import workload_class
    from .workloads.base import set_offline_env

    set_offline_env()  # before the libraries import, as a worker does
    done: list[str] = []
    for kind in dict.fromkeys(kinds):
        try:
            cls = workload_class(kind)
        except WorkerError:  # its worker reports the unknown kind itself
            continue
        for entry in getattr(cls, "PRELOAD", ()):
            mod, _, names = entry.partition(":")
            m = importlib.import_module(mod)
            for n in filter(None, names.split(",")):
                getattr(m, n)
            if entry not in done:
                done.append(entry)
    return done


# ---- the preloader process ---------------------------------------------------------------------

def _send(conn: socket.socket, obj: dict) -> None:
    conn.sendall((json.dumps(obj) + "\n").encode())


def _child(conn: socket.socket, fds: list[int], req: dict, started_w: int) -> None:
    """In the forked worker: become the worker a spawn would have started, then run it."""
    code = 1
    try:
        os.setsid()
        os.close(started_w)  # its own session and process group exist: the preloader may answer
        conn.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in (req.get("env") or {}).items()})
        if req.get("cwd"):
            os.chdir(req["cwd"])
        sys.stdin = open(0, "r", buffering=1, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        threads = os.environ.get("MI300X_CERT_CPU_THREADS")
        if threads and "torch" in sys.modules:  # a spawned worker's torch reads it at start
            sys.modules["torch"].set_num_threads(int(threads))
        from .worker import main

        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - the worker must end with a code, whatever happened
        try:
            traceback.print_exc()
        except Exception:
            pass
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:
                pass
        os._exit(code)


def _check_fork_safe() -> None:
    """Refuse to fork workers (the launcher then spawns them) when the imports left more than one
    thread (a fork copies only the calling one; a lock another held stays locked in the child) or
    initialized a GPU driver (a forked child cannot use it: torch marks it a bad fork). The second is
    asked of a probe child, the way a worker would find out."""
    torch = sys.modules.get("torch")
    bad = getattr(getattr(torch, "_C", None), "_cuda_isInBadFork", None)
    if bad is not None:
        pid = os.fork()
        if pid == 0:  # the probe only asks and exits
            os._exit(3 if bad() else 0)
        if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
            raise RuntimeError("an import initialized the GPU driver; a forked worker could not use the card")
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    if threads > 1:
        raise RuntimeError(f"{threads} threads after the imports; forking could deadlock a worker")


def serve(sock_path: str, kinds: list[str]) -> int:
    """The preloader: connect to the launcher, import, say ``ready``, fork a worker per request."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sock_path)
    try:
        return _serve(conn, kinds)
    finally:  # the launcher removes them too; whichever ends last (a launcher killed cannot)
        with contextlib.suppress(OSError):
            os.unlink(sock_path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(sock_path))


def _serve(conn: socket.socket, kinds: list[str]) -> int:
    t0 = time.time()
    try:
        loaded = preload_kinds(kinds)
    except Exception as e:
        traceback.print_exc()
        _send(conn, {"ready": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    try:
        _check_fork_safe()
    except RuntimeError as e:  # this host's libraries: every later preloader would refuse too
        print(f"preloader: refusing to fork workers: {e}", file=sys.stderr, flush=True)
        _send(conn, {"ready": False, "refused": True, "error": f"{type(e).__name__}: {e}"})
        return 1
    _send(conn, {"ready": True, "pid": os.getpid(), "loaded": loaded, "import_s": time.time() - t0})
    children: set[int] = set()
    buf = b""
    while True:
        while children:  # reap: report every finished worker
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            children.discard(pid)
            _send(conn, {"exit": pid, "returncode": os.waitstatus_to_exitcode(status)})
        r, _, _ = select.select([conn], [], [], 0.02)
        if not r:
            continue
        data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
        if not data:
            break  # the launcher closed the socket (or died): no more workers
        buf += data
        while b"\n" not in buf:  # a large request arrives in pieces; its fds came with the first
            more = conn.recv(1 << 20)
            if not more:
                return 0
            buf += more
        line, _, buf = buf.partition(b"\n")
        req = json.loads(line)
        started_r, started_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(started_r)
            _child(conn, fds, req, started_w)
        os.close(started_w)
        os.read(started_r, 1)  # end of file once the worker has its own session (or has died)
        os.close(started_r)
        for fd in fds:  # only the worker keeps its ends: its stdout must reach EOF when it exits
            os.close(fd)
        children.add(pid)
        _send(conn, {"spawned": pid, "id": req.get("id")})
    return 0


# ---- the launcher's side -----------------------------------------------------------------------

class ForkedProcess:
    """What the launcher uses of ``subprocess.Popen``, for a worker the preloader forked. Its exit
    status comes from the preloader; a pidfd (taken as soon as the pid is known) says whether it
    still runs when the preloader is gone, and signals exactly this process, never a recycled pid."""

    def __init__(self, pre: "Preloader", pid: int, stdin: Any, stdout: Any):
        self._pre = pre
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.returncode: int | None = None
        self.status_lost = False  # it ended after the preloader did: its exit status is unknown
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # an old kernel, or it already ended and was reaped
            pass

    def _ended(self) -> bool:
        if self._pidfd is not None:
            return bool(select.select([self._pidfd], [], [], 0)[0])  # readable once it has exited
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
        except (OSError, IndexError):
            return True

    def poll(self) -> int | None:
        if self.returncode is None:
            rc = self._pre.take_exit(self.pid)
            if rc is None and not self._pre.alive and self._ended():
                rc, self.status_lost = 255, True  # never read as success
            if rc is not None:
                self.returncode = rc
                if self._pidfd is not None:
                    os.close(self._pidfd)
                    self._pidfd = None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if end is not None and time.time() > end:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.poll() is not None:
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass


class Preloader:
    """One preloader process and the launcher's connection to it (see the module doc). ``env``:
    the workers' environment (the preloader runs with :func:`preloader_env` of it)."""

    def __init__(self, argv_prefix: list[str] | None, env: dict, kinds: list[str], *, timeout_s: float = 600.0,
                 log_path: Path | None = None, on_start: Any = None):
        self.kinds = list(kinds)
        self._dir = tempfile.mkdtemp(prefix="mi300x-cert-preload-")
        os.chmod(self._dir, 0o700)
        path = os.path.join(self._dir, "s")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)
        self._exits: dict[int, int] = {}
        self._replies: list[dict] = []
        self._cv = threading.Condition()
        self._closed = False
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(list(argv_prefix or []) + [sys.executable, "-m", "mi300x_cert.preload", path,
                                                                 ",".join(self.kinds)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
                                     env=preloader_env(env), start_new_session=True)
        self.conn: socket.socket | None = None
        try:
            if on_start is not None:  # e.g. the network monitor audits its sockets from its first import
                on_start(self.proc.pid)
            self._listener.settimeout(0.2)
            end = time.time() + timeout_s
            while self.conn is None:
                try:
                    self.conn, _ = self._listener.accept()
                except socket.timeout:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"the preloader exited with code {self.proc.returncode} before it connected")
                    if time.time() > end:
                        raise RuntimeError(f"the preloader did not connect within {timeout_s:g}s")
            self.conn.settimeout(None)
            self._reader = threading.Thread(target=self._read, name="preloader-reader", daemon=True)
            self._reader.start()
            msg = self._next_reply(lambda m: "ready" in m, end)
            if not msg.get("ready"):
                why = f"the preloader is not ready: {msg.get('error')}"
                if msg.get("refused"):
                    _HOST["refused"] = why
                raise RuntimeError(why)
        except BaseException:
            self.close()
            raise

    # -- messages from the preloader ------------------------------------------------------------
    def _read(self) -> None:
        assert self.conn is not None
        f = self.conn.makefile("rb")
        try:
            for raw in f:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                with self._cv:
                    if "exit" in msg:
                        self._exits[int(msg["exit"])] = int(msg["returncode"])
                    else:
                        self._replies.append(msg)
                    self._cv.notify_all()
        except OSError:
            pass
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _next_reply(self, match: Any, end: float) -> dict:
        with self._cv:
            while True:
                for i, m in enumerate(self._replies):
                    if match(m):
                        return self._replies.pop(i)
                if self._closed:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(timeout=2)
                    raise RuntimeError(f"the preloader ended (code {self.proc.poll()}) before it answered")
                left = end - time.time()
                if left <= 0:
                    raise RuntimeError("the preloader did not answer in time")
                self._cv.wait(min(left, 0.5))

    @property
    def alive(self) -> bool:
        return self.conn is not None and not self._closed and self.proc.poll() is None

    def take_exit(self, pid: int) -> int | None:
        """The exit status the preloader reported for ``pid`` (once: a recycled pid starts afresh)."""
        with self._cv:
            return self._exits.pop(pid, None)

    # -- requests -------------------------------------------------------------------------------
    def spawn(self, env: dict, stderr_fd: int | None, timeout_s: float = 30.0) -> ForkedProcess:
        """Fork one worker with ``env``; its stderr goes to ``stderr_fd`` (``None``: /dev/null)."""
        if not self.alive:
            raise RuntimeError("the preloader is not running")
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err = stderr_fd if stderr_fd is not None else os.open(os.devnull, os.O_WRONLY)
        rid = os.urandom(6).hex()
        try:
            assert self.conn is not None
            req = {"id": rid, "env": dict(env), "cwd": os.getcwd()}
            socket.send_fds(self.conn, [(json.dumps(req) + "\n").encode()], [in_r, out_w, err])
        finally:
            os.close(in_r)
            os.close(out_w)
            if stderr_fd is None:
                os.close(err)
        stdin = os.fdopen(in_w, "w", buffering=1)
        stdout = os.fdopen(out_r, "r", buffering=1)
        try:
            msg = self._next_reply(lambda m: m.get("id") == rid, time.time() + timeout_s)
        except BaseException:
            stdin.close()
            stdout.close()
            raise
        return ForkedProcess(self, int(msg["spawned"]), stdin, stdout)

    def close(self) -> None:
        if self.conn is not None:  # shut down first: the reader's file keeps the socket open otherwise
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)
        for obj in (self.conn, self._listener):
            try:
                if obj is not None:
                    obj.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self._dir, "s"))
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)


def preloader_env(env: dict) -> dict:
    """The preloader's environment: the workers' without what differs from worker to worker; one
    thread per math library (it computes nothing, and a process with one thread forks safely); and
    the device count from NVML, so that a library asking at import whether a GPU exists does not
    initialize the CUDA driver (diffusers does), which no forked worker could use after."""
    out = {k: v for k, v in env.items() if k not in _PER_WORKER}
    out.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return out


def _key(argv_prefix: list[str] | None, env: dict, kinds: list[str]) -> str:
    blob = json.dumps([list(argv_prefix or []), sorted(preloader_env(env).items()), sorted(set(kinds))])
    return hashlib.sha256(blob.encode()).hexdigest()


class _Pool:
    def __init__(self) -> None:
        self._by_key: dict[str, Preloader] = {}
        self.failed: dict[str, str] = {}

    def get(self, argv_prefix: list[str] | None, env: dict, kinds: list[str], timeout_s: float,
            log_path: Path | None, on_start: Any = None) -> Preloader:
        key = _key(argv_prefix, env, kinds)
        pre = self._by_key.get(key)
        if pre is not None and pre.alive:
            return pre
        if pre is not None:  # it ended under a running experiment: the rest of it spawns
            self.failed[key] = f"the preloader ended during the experiment (code {pre.proc.poll()})"
            pre.close()
            del self._by_key[key]
        if key in self.failed:  # do not pay a failing import again for every case
            raise RuntimeError(self.failed[key])
        try:
            pre = Preloader(argv_prefix, env, kinds, timeout_s=timeout_s, log_path=log_path, on_start=on_start)
        except Exception as e:
            self.failed[key] = str(e)
            raise
        self._by_key[key] = pre
        return pre

    def close(self) -> None:
        for pre in self._by_key.values():
            pre.close()
        self._by_key.clear()


# set when a preloader refused to fork on this host (its libraries leave a thread or an initialized
# driver after import): every later one would too, so this process spawns without paying the import
_HOST: dict[str, str] = {}


def host_refusal() -> str | None:
    return _HOST.get("refused")


_POOL: contextvars.ContextVar[_Pool | None] = contextvars.ContextVar("mi300x_cert_preload_pool", default=None)


def active_pool() -> _Pool | None:
    return _POOL.get()


@contextlib.contextmanager
def preloading() -> Iterator[_Pool]:
    """Share preloaders between the launches inside (the cases of one experiment)."""
    outer = _POOL.get()
    if outer is not None:
        yield outer
        return
    pool = _Pool()
    token = _POOL.set(pool)
    try:
        yield pool
    finally:
        _POOL.reset(token)
        pool.close()


if __name__ == "__main__":
    code = serve(sys.argv[1], [k for k in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if k])
    sys.stderr.flush()
    os._exit(code)
