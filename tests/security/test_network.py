"""Network containment on bwrap: real traffic between network namespaces of this machine.

A test "outside" namespace (``ip netns add`` + a veth to the host) holds two addresses with a
TCP server each: the egress targets a sandbox may or may not reach. Servers on the host's
127.0.0.1, on the host's bridge address and on the host's end of the outside veth (another of
the host's own addresses) stand for Ray, Redis and the API: no sandbox may ever reach them.
Nothing here sends a packet beyond this machine's namespaces.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import pytest

from rock_serve import errors
from rock_serve.config import BridgeNetworkConfig, BwrapRuntimeConfig
from rock_serve.protocol import ExecRequest, SandboxSpec
from rock_serve.runtime._netns import NETNS_DIR, BridgeNetwork
from tests.contract.conftest import _BWRAP_SKIP, TEST_CGROUP_PARENT

pytestmark = [
    pytest.mark.bwrap,
    pytest.mark.skipif(_BWRAP_SKIP is not None, reason=str(_BWRAP_SKIP)),
]

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


def bridge_config(octet: int, **kwargs) -> BridgeNetworkConfig:
    return BridgeNetworkConfig(
        name=f"rkt{uuid.uuid4().hex[:8]}", subnet=f"10.215.{octet}.0/24", **kwargs
    )


def runtime_config(tmp_path, bridge: BridgeNetworkConfig) -> BwrapRuntimeConfig:
    return BwrapRuntimeConfig(
        state_dir=str(tmp_path / "state"),
        cgroup_parent=TEST_CGROUP_PARENT,
        allow_network=True,
        bridge=bridge,
    )


@contextlib.asynccontextmanager
async def bwrap(tmp_path, bridge: BridgeNetworkConfig):
    rt = runtime_config(tmp_path, bridge).build()
    try:
        yield rt
    finally:
        for info in await rt.list():
            await rt.remove(info.id)
        await rt.close()
        assert rt.net is not None
        rt.net.teardown()


@pytest.fixture
async def rt(tmp_path, octet):
    async with bwrap(tmp_path, bridge_config(octet)) as runtime:
        yield runtime


def new_id() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


async def started(runtime, spec: SandboxSpec):
    sid = new_id()
    await runtime.create(sid, spec)
    return sid, await runtime.start(sid)


async def probe(handle, *targets: str) -> dict[str, str]:
    result = await handle.exec(
        ExecRequest(command=["python3", "-c", PROBE, *targets], timeout=60)
    )
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


def host_targets(rt, outside, host_servers) -> list[str]:
    loop, anyaddr = host_servers
    gateway = str(rt.net.gateway)
    return [
        f"127.0.0.1:{loop.port}",  # the host's loopback service (in the sandbox: its own lo)
        f"{gateway}:{anyaddr.port}",  # the host's bridge address
        f"{outside.host_ip}:{anyaddr.port}",  # another of the host's addresses
        f"127.0.0.1:{anyaddr.port}",
    ]


def test_host_servers_answer_on_the_host(outside, host_servers):
    """The control: from the host itself every host server answers."""
    loop, anyaddr = host_servers
    for addr, port in (("127.0.0.1", loop.port), (outside.host_ip, anyaddr.port)):
        with socket.create_connection((addr, port), timeout=3) as s:
            assert s.recv(16) == b"host"


async def test_none_reaches_nothing(rt, outside, host_servers):
    _, h = await started(rt, SandboxSpec())
    assert await interfaces(h) == ["lo"]
    targets = [f"{outside.allowed}:{OUT_PORT}", *host_targets(rt, outside, host_servers)]
    verdicts = await probe(h, *targets)
    assert not any(reached(v) for v in verdicts.values()), verdicts


async def test_bridge_reaches_the_allowed_target_only(rt, outside, host_servers):
    spec = SandboxSpec(network="bridge", egress=[f"{outside.allowed}:{OUT_PORT}"])
    sid, h = await started(rt, spec)
    assert os.path.exists(rt.net.netns_path(sid))
    assert await interfaces(h) == ["eth0", "lo"]
    allowed = f"{outside.allowed}:{OUT_PORT}"
    denied = [f"{outside.denied}:{OUT_PORT}", f"{outside.allowed}:{OTHER_PORT}"]
    hosts = host_targets(rt, outside, host_servers)
    verdicts = await probe(h, allowed, *denied, *hosts)
    assert verdicts[allowed] == f"OK outside-{outside.allowed}:{OUT_PORT}", verdicts
    for target in denied + hosts:
        assert not reached(verdicts[target]), (target, verdicts)


async def test_default_allow_list_reaches_outside_but_never_the_host(rt, outside, host_servers):
    _, h = await started(rt, SandboxSpec(network="bridge"))
    out = [f"{outside.allowed}:{OUT_PORT}", f"{outside.denied}:{OTHER_PORT}"]
    hosts = host_targets(rt, outside, host_servers)
    verdicts = await probe(h, *out, *hosts)
    assert all(reached(verdicts[t]) for t in out), verdicts
    assert not any(reached(verdicts[t]) for t in hosts), verdicts


async def test_host_side_rules_hold_without_the_sandbox_rules(rt, outside, host_servers):
    """Defence in depth: with the sandbox's own table gone, the host's table still drops."""
    sid, h = await started(rt, SandboxSpec(network="bridge"))
    sh("nsenter", f"--net={rt.net.netns_path(sid)}", "nft", "delete", "table", "inet", "rock")
    _, anyaddr = host_servers
    hosts = [f"{rt.net.gateway}:{anyaddr.port}", f"{outside.host_ip}:{anyaddr.port}"]
    verdicts = await probe(h, f"{outside.allowed}:{OUT_PORT}", *hosts)
    assert reached(verdicts[f"{outside.allowed}:{OUT_PORT}"]), verdicts
    assert not any(reached(verdicts[t]) for t in hosts), verdicts


async def test_sandbox_cannot_change_its_network(rt):
    _, h = await started(rt, SandboxSpec(network="bridge"))
    for cmd in (
        "nft flush ruleset",
        f"ip addr add {rt.net.subnet.network_address + 250}/24 dev eth0",
        "ip link set eth0 down",
        "ip route del default",
    ):
        result = await h.exec(ExecRequest(command=["sh", "-c", cmd]))
        assert result.exit_code != 0, (cmd, result)
    rules = await h.exec(ExecRequest(command=["sh", "-c", "nft list ruleset"]))
    assert rules.exit_code != 0  # not even readable without CAP_NET_ADMIN


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


async def serving_peer(runtime) -> tuple[str, str]:
    """A networked sandbox with a server on port 9000; returns (id, address)."""
    sid, h = await started(runtime, SandboxSpec(network="bridge"))
    addr = runtime.net.address(sid)
    assert addr is not None
    await h.exec(ExecRequest(command=["sh", "-c", SERVE_IN_SANDBOX]))
    ready = await h.exec(ExecRequest(command=["python3", "-c", WAIT_LISTENING, addr]))
    assert ready.exit_code == 0, ready
    return sid, addr


async def test_two_sandboxes_cannot_talk(rt):
    _, addr = await serving_peer(rt)
    _, other = await started(rt, SandboxSpec(network="bridge"))
    verdicts = await probe(other, f"{addr}:9000")
    assert not reached(verdicts[f"{addr}:9000"]), verdicts


async def test_sandboxes_talk_when_the_bridge_allows_it(tmp_path, octet):
    # Another subnet than the module's bridge: both bridges exist at once.
    async with bwrap(tmp_path, bridge_config((octet + 1) % 254 + 1, isolate=False)) as runtime:
        _, addr = await serving_peer(runtime)
        _, other = await started(runtime, SandboxSpec(network="bridge"))
        verdicts = await probe(other, f"{addr}:9000", f"{runtime.net.gateway}:22")
        assert verdicts[f"{addr}:9000"] == "OK peer", verdicts
        assert not reached(verdicts[f"{runtime.net.gateway}:22"])


def host_state(net: BridgeNetwork, sid: str) -> dict[str, object]:
    return {
        "netns": os.path.exists(net.netns_path(sid)),
        "veth": os.path.isdir(f"/sys/class/net/{net.veth(sid)}"),
        "lease": net.address(sid),
    }


async def test_nothing_is_left_after_remove(rt):
    sid, h = await started(rt, SandboxSpec(network="bridge", egress=["10.99.0.0/16"]))
    addr = rt.net.address(sid)
    assert host_state(rt.net, sid) == {"netns": True, "veth": True, "lease": addr}
    await rt.remove(sid)
    assert host_state(rt.net, sid) == {"netns": False, "veth": False, "lease": None}
    assert rt.net.netns(sid) not in sh("ip", "netns", "list")
    assert addr not in sh("nft", "list", "table", "inet", rt.net.table)
    await rt.remove(sid)  # idempotent


async def test_a_new_worker_removes_the_leftovers_of_gone_sandboxes(tmp_path, octet):
    bridge = bridge_config(octet)
    async with bwrap(tmp_path, bridge) as first:
        kept, _ = await started(first, SandboxSpec(network="bridge"))
        # A namespace whose sandbox is gone (the Worker died between the two steps).
        first.net.create("t-orphan", None)
        assert host_state(first.net, "t-orphan")["netns"] is True
        second = runtime_config(tmp_path, bridge).build()
        assert second.net is not None
        assert host_state(second.net, "t-orphan") == {"netns": False, "veth": False, "lease": None}
        assert host_state(second.net, kept)["netns"] is True  # adopted, not removed
        await second.close()


async def test_host_knobs(rt):
    br = rt.net.bridge
    with open(f"/proc/sys/net/ipv4/conf/{br}/route_localnet") as f:
        assert f.read().strip() == "0"
    with open("/proc/sys/net/ipv4/conf/all/route_localnet") as f:
        assert f.read().strip() == "0"
    with open(f"/proc/sys/net/ipv6/conf/{br}/disable_ipv6") as f:
        assert f.read().strip() == "1"  # no link-local address of the host on the bridge
    table = sh("nft", "list", "table", "inet", rt.net.table)
    assert f'iifname "{br}" drop' in table


async def test_typed_refusals(tmp_path, rt):
    with pytest.raises(errors.InvalidConfig, match="host"):
        await rt.create(new_id(), SandboxSpec(network="host"))
    with pytest.raises(errors.InvalidRequest, match="egress"):
        await rt.create(new_id(), SandboxSpec(egress=["10.0.0.0/8"]))
    with pytest.raises(errors.InvalidRequest, match="expected"):
        await rt.create(new_id(), SandboxSpec(network="bridge", egress=["10.0.0.0/8:x"]))
    narrow = BridgeNetworkConfig(
        name=f"rkt{uuid.uuid4().hex[:8]}", subnet="10.216.0.0/24", egress_allow=["10.1.0.0/16"]
    )
    async with bwrap(tmp_path / "narrow", narrow) as strict:
        with pytest.raises(errors.InvalidRequest, match="not allowed"):
            await strict.create(new_id(), SandboxSpec(network="bridge", egress=["10.0.0.0/8"]))
        with pytest.raises(errors.InvalidRequest, match="not allowed"):
            await strict.create(new_id(), SandboxSpec(network="bridge", egress=["0.0.0.0/0"]))
        assert await strict.list() == []
    closed = BwrapRuntimeConfig(
        state_dir=str(tmp_path / "closed"), cgroup_parent=TEST_CGROUP_PARENT
    ).build()
    with pytest.raises(errors.InvalidConfig, match="allow_network"):
        await closed.create(new_id(), SandboxSpec(network="bridge"))
    assert closed.net is None
    await closed.close()
