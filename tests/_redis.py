"""A real ``redis-server`` for tests: started on a loopback port, stopped, killed, restarted.

One :class:`RedisServer` owns one process at a time on a fixed port and directory, so a test
can stop or kill it and start it again on the same port (with ``persistent=True`` the data
comes back from the append-only file). Readiness is a PING over a raw socket with a deadline;
nothing sleeps a fixed time. Only the process this object started is ever signalled.

    server = RedisServer(tmp_path, persistent=True).start()
    ... server.url ...
    server.kill(); server.start()     # same port, same dir
    server.stop()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def have_redis_server() -> bool:
    """True when a ``redis-server`` binary is available.

    With ``ROCK_REQUIRE_REDIS=1`` (set by ``.ci/run``) a missing binary is an error, so CI can
    never pass by skipping the Redis tests.
    """
    found = os.access(REDIS_SERVER, os.X_OK)
    if not found and os.environ.get("ROCK_REQUIRE_REDIS") == "1":
        raise RuntimeError("ROCK_REQUIRE_REDIS=1 but redis-server is not installed")
    return found


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(port: int, timeout: float = 0.5) -> bool:
    """True when a Redis on ``127.0.0.1:port`` answers PING with PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on a fixed loopback port and data directory."""

    def __init__(self, directory: Path, *, port: int | None = None, persistent: bool = False):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        argv = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", "",
        ]  # fmt: skip
        if self.persistent:
            # fsync every write: even kill -9 loses nothing that was acknowledged.
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        return argv

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING (or raise with its log)."""
        assert not self.running, "already running"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if ping(self.port):
                return self
            time.sleep(0.01)
        self._reap(signal.SIGKILL)
        tail = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis writes its files and exits), then SIGKILL after ``timeout``."""
        self._reap(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash (with ``persistent`` nothing acknowledged is lost)."""
        self._reap(signal.SIGKILL)

    def restart(self, *, kill: bool = False) -> RedisServer:
        """Stop (or kill) and start again on the same port and directory."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the server for the block: connections hang instead of failing."""
        assert self.proc is not None and self.running
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def _reap(self, sig: signal.Signals, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
