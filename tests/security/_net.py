"""Shared by the network tests: an outside namespace, host servers, a probe from inside.

Nothing here sends a packet beyond this machine's namespaces.
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import pytest

from rock_serve.protocol import ExecRequest
from rock_serve.runtime._netns import NETNS_DIR

#: Port of the servers in the outside namespace (it has the namespace to itself).
OUT_PORT = 8080
OTHER_PORT = 8081

#: Runs inside a sandbox: connects to each host:port argument, prints one verdict line each.
PROBE = r"""
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=3) as s:
            s.settimeout(3)
            print(target, "OK", s.recv(64).decode())
    except OSError as exc:
        print(target, "ERR", type(exc).__name__, exc.errno)
"""

#: Runs in the outside namespace: answers every connection with its own address and port.
SERVER = r"""
import socket, sys, threading
def serve(sock):
    while True:
        conn, _ = sock.accept()
        with conn:
            conn.sendall(("outside-%s:%d" % conn.getsockname()).encode())
for port in map(int, sys.argv[1:]):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def sh(*argv: str, stdin: str | None = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True)
    return proc.stdout


class Outside:
    """A namespace beside the host with addresses ``allowed`` and ``denied`` and servers."""

    def __init__(self, octet: int) -> None:
        tag = uuid.uuid4().hex[:8]
        self.name = f"rkt-out-{tag}"
        self.veth = f"rkto{tag}"
        self.host_ip = f"10.214.{octet}.1"
        self.allowed = f"10.214.{octet}.2"
        self.denied = f"10.214.{octet}.3"
        sh("ip", "netns", "add", self.name)
        try:
            sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
               "netns", self.name)  # fmt: skip
            sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.veth)
            sh("ip", "link", "set", self.veth, "up")
            batch = (
                f"addr add {self.allowed}/24 dev eth0\naddr add {self.denied}/24 dev eth0\n"
                "link set eth0 up\nlink set lo up\n"
            )
            sh("ip", "-n", self.name, "-b", "-", stdin=batch)
            self.server = subprocess.Popen(
                ["nsenter", f"--net={NETNS_DIR}/{self.name}", sys.executable, "-c", SERVER,
                 str(OUT_PORT), str(OTHER_PORT)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert self.server.stdout is not None
            assert self.server.stdout.readline().strip() == "ready"
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.kill()
            server.wait()
            for pipe in (server.stdin, server.stdout):
                if pipe is not None:
                    pipe.close()
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


class HostServer:
    """A TCP server of the host (its own namespace) that answers ``host``."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((address, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"host")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def octet() -> int:
    return random.randrange(1, 255)


@pytest.fixture(scope="module")
def outside(octet) -> Iterator[Outside]:
    out = Outside(octet)
    try:
        yield out
    finally:
        out.close()


@pytest.fixture(scope="module")
def host_servers() -> Iterator[tuple[HostServer, HostServer]]:
    """(one on 127.0.0.1, one on every host address)."""
    loop, anyaddr = HostServer("127.0.0.1"), HostServer("0.0.0.0")
    try:
        yield loop, anyaddr
    finally:
        loop.close()
        anyaddr.close()


async def probe(handle, *targets: str) -> dict[str, str]:
    result = await handle.exec(ExecRequest(command=["python3", "-c", PROBE, *targets], timeout=60))
    assert result.exit_code == 0, result
    verdicts = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert set(verdicts) == set(targets), result
    return verdicts


async def interfaces(handle) -> list[str]:
    """Network interfaces the sandbox sees (/proc/net/dev: its /sys is an empty tmpfs)."""
    result = await handle.exec(ExecRequest(command=["cat", "/proc/net/dev"]))
    return sorted(line.split(":")[0].strip() for line in result.stdout.splitlines()[2:])


def reached(verdict: str) -> bool:
    return verdict.startswith("OK")


SERVE_IN_SANDBOX = (
    "setsid python3 -c \"import socket\ns=socket.socket()\ns.bind(('0.0.0.0',9000))\n"
    "s.listen()\nwhile True:\n c,_=s.accept(); c.sendall(b'peer'); c.close()\" "
    "</dev/null >/dev/null 2>&1 &"
)
WAIT_LISTENING = (
    "import socket,time,sys\nend=time.time()+20\nwhile time.time()<end:\n"
    " try:\n  socket.create_connection((sys.argv[1],9000),timeout=1).close(); sys.exit(0)\n"
    " except OSError: time.sleep(0.05)\nsys.exit(1)"
)


async def serve_inside(handle, addr: str) -> None:
    """Start a server on port 9000 in the sandbox; return once it answers on ``addr``."""
    await handle.exec(ExecRequest(command=["sh", "-c", SERVE_IN_SANDBOX]))
    ready = await handle.exec(ExecRequest(command=["python3", "-c", WAIT_LISTENING, addr]))
    assert ready.exit_code == 0, ready
