"""A real registry for tests: Debian's ``docker-registry`` (distribution 2.8) on loopback.

    reg = Registry(tmp_path, auth=("alice", "s3cret")).start()
    reg.push("oci:/var/cache/rock-serve/images:bookworm", "test/base:v1")
    ... reg.ref("test/base:v1") ...   # "127.0.0.1:PORT/test/base:v1"
    reg.stop()

Storage is a directory per registry; with ``auth`` it checks an htpasswd file (bcrypt, made
with ``htpasswd -B``). Readiness is ``GET /v2/`` answering (200, or 401 with auth) under a
deadline; nothing sleeps a fixed time. Only the process this object started is signalled.
The OCI test images come from ``scripts/build-test-images`` (:data:`IMAGE_CACHE`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
HTPASSWD = shutil.which("htpasswd") or "/usr/bin/htpasswd"
SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"
#: The OCI layout that scripts/build-test-images writes (tags bookworm, multilayer, nopython).
IMAGE_CACHE = os.environ.get("ROCK_IMAGE_CACHE", "/var/cache/rock-serve/images")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def registry_skip_reason() -> str | None:
    """Why the registry tests cannot run here (None = they can); builds the images if needed.

    With ``ROCK_REQUIRE_DOCKER=1`` (CI) the caller turns a reason into a failure.
    """
    for tool in (REGISTRY, HTPASSWD, SKOPEO):
        if not os.access(tool, os.X_OK):
            return f"{tool} is not installed"
    if not test_images_built():
        try:
            subprocess.run(
                ["bash", str(ROOT / "scripts" / "build-test-images")],
                check=True,
                capture_output=True,
                timeout=900,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return f"scripts/build-test-images failed: {exc}"
    return None if test_images_built() else "the OCI test images are not built"


def test_images_built() -> bool:
    """True when the OCI layout has the three test tags."""
    try:
        index = Path(IMAGE_CACHE, "index.json").read_text()
    except OSError:
        return False
    return all(f'"org.opencontainers.image.ref.name":"{t}"' in index for t in _TAGS)


_TAGS = ("bookworm", "multilayer", "nopython")


def oci(tag: str) -> str:
    """The skopeo name of a test image in the cache layout."""
    return f"oci:{IMAGE_CACHE}:{tag}"


class Registry:
    """One docker-registry process on a loopback port, storing in ``directory``."""

    def __init__(self, directory: Path, *, auth: tuple[str, str] | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.auth = auth
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ref(self, name: str) -> str:
        """``name`` (``repo:tag``) as a reference into this registry."""
        return f"{self.host}/{name}"

    def _config(self) -> Path:
        lines = [
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.dir / 'data'}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.host}",
        ]
        if self.auth is not None:
            htpasswd = self.dir / "htpasswd"
            subprocess.run(
                [HTPASSWD, "-Bbc", str(htpasswd), self.auth[0], self.auth[1]],
                check=True,
                capture_output=True,
            )
            lines += ["auth:", "  htpasswd:", "    realm: rock-test", f"    path: {htpasswd}"]
        path = self.dir / "config.yml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 20.0) -> Registry:
        """Start it and wait until ``/v2/`` answers."""
        config = self._config()
        log = open(self.dir / "registry.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [REGISTRY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not answer in {timeout}s: {self.log_tail()}")

    def ready(self) -> bool:
        """True when ``/v2/`` answers (200, or 401 when auth is on)."""
        try:
            with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=0.5):
                return True
        except urllib.error.HTTPError as exc:
            return exc.code == 401
        except OSError:
            return False

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "registry.log").read_text()[-2000:]
        return ""

    def push(self, source: str, name: str) -> str:
        """Copy ``source`` (a skopeo name) to ``name`` in this registry; returns the ref."""
        argv = [SKOPEO, "copy", "--quiet", "--dest-tls-verify=false"]
        if self.auth is not None:
            argv += ["--dest-creds", f"{self.auth[0]}:{self.auth[1]}"]
        subprocess.run([*argv, source, f"docker://{self.ref(name)}"], check=True, timeout=600)
        return self.ref(name)

    def stop(self) -> None:
        """Terminate the process this object started (kill after 5 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class SilentRegistry:
    """A loopback "registry" that accepts connections and never answers until released.

    What an unreachable destination looks like to skopeo when a firewall or a hung server
    holds the connection: ``accepted`` counts the connections held; :meth:`release` closes
    them and every later one at once (the client then sees the server go away).

        with SilentRegistry() as reg:
            ... push to reg.ref("x/y:v1") ...; wait_until(lambda: reg.accepted); reg.release()
    """

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._released = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def ref(self, name: str) -> str:
        return f"127.0.0.1:{self.port}/{name}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed: stop
                return
            with self._lock:
                if self._released:
                    conn.close()
                    continue
                self._held.append(conn)
                self.accepted += 1

    def release(self) -> None:
        with self._lock:
            self._released = True
            for conn in self._held:
                conn.close()

    def __enter__(self) -> SilentRegistry:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)
