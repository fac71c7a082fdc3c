"""Network containment on bwrap: real traffic between network namespaces of this machine.

A test "outside" namespace (``ip netns add`` + a veth to the host) holds two addresses with a
TCP server each: the egress targets a sandbox may or may not reach. Servers on the host's
127.0.0.1, on the host's bridge address and on the host's end of the outside veth (another of
the host's own addresses) stand for Ray, Redis and the API: no sandbox may ever reach them.
Nothing here sends a packet beyond this machine's namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid

import pytest

from rock_serve import errors
from rock_serve.config import BridgeNetworkConfig, BwrapRuntimeConfig
from rock_serve.protocol import ExecRequest, SandboxSpec
from rock_serve.runtime._netns import BridgeNetwork
from tests._wait import wait_until
from tests.contract.conftest import _BWRAP_SKIP, TEST_CGROUP_PARENT
from tests.security._net import (
    OTHER_PORT,
    OUT_PORT,
    host_servers,
    interfaces,
    octet,
    outside,
    probe,
    reached,
    serve_inside,
    sh,
)

pytestmark = [
    pytest.mark.bwrap,
    pytest.mark.skipif(_BWRAP_SKIP is not None, reason=str(_BWRAP_SKIP)),
]
__all__ = ["host_servers", "octet", "outside"]  # fixtures used here


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


async def test_host_side_rules_hold_without_the_sandbox_rules(
    tmp_path, octet, outside, host_servers
):
    """Defence in depth: with the sandbox's own table gone (as under gVisor, whose netstack
    bypasses it), the host's table still drops the host's addresses and the deny-list."""
    bridge = bridge_config((octet + 2) % 254 + 1, egress_deny=[f"{outside.denied}/32"])
    async with bwrap(tmp_path, bridge) as runtime:
        sid, h = await started(runtime, SandboxSpec(network="bridge"))
        path = runtime.net.netns_path(sid)
        sh("nsenter", f"--net={path}", "nft", "delete", "table", "inet", "rock")
        _, anyaddr = host_servers
        hosts = [f"{runtime.net.gateway}:{anyaddr.port}", f"{outside.host_ip}:{anyaddr.port}"]
        denied = f"{outside.denied}:{OUT_PORT}"
        verdicts = await probe(h, f"{outside.allowed}:{OUT_PORT}", denied, *hosts)
        assert reached(verdicts[f"{outside.allowed}:{OUT_PORT}"]), verdicts
        assert not any(reached(verdicts[t]) for t in [denied, *hosts]), verdicts


async def test_the_allow_list_holds_on_the_host_too(rt, outside, host_servers):
    """The host keeps a copy of each sandbox's allow-list: without the sandbox's own table,
    only the allowed target still answers."""
    allowed = f"{outside.allowed}:{OUT_PORT}"
    sid, h = await started(rt, SandboxSpec(network="bridge", egress=[allowed]))
    sh("nsenter", f"--net={rt.net.netns_path(sid)}", "nft", "delete", "table", "inet", "rock")
    _, anyaddr = host_servers
    others = [
        f"{outside.denied}:{OUT_PORT}",
        f"{outside.allowed}:{OTHER_PORT}",
        f"{rt.net.gateway}:{anyaddr.port}",
        f"{outside.host_ip}:{anyaddr.port}",
    ]
    verdicts = await probe(h, allowed, *others)
    assert verdicts[allowed] == f"OK outside-{allowed}", verdicts
    assert not any(reached(verdicts[t]) for t in others), verdicts


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


async def serving_peer(runtime) -> tuple[str, str]:
    """A networked sandbox with a server on port 9000; returns (id, address)."""
    sid, h = await started(runtime, SandboxSpec(network="bridge"))
    addr = runtime.net.address(sid)
    assert addr is not None
    await serve_inside(h, addr)
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
    assert f"{addr} . 10.99.0.0/16" in sh("nft", "list", "table", "inet", rt.net.table)
    await rt.remove(sid)
    assert host_state(rt.net, sid)["netns"] is False
    assert host_state(rt.net, sid)["lease"] is None
    wait_until(lambda: not host_state(rt.net, sid)["veth"], what="the veth gone")  # kernel's
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
        assert host_state(second.net, "t-orphan")["netns"] is False
        assert host_state(second.net, "t-orphan")["lease"] is None
        wait_until(lambda: not host_state(second.net, "t-orphan")["veth"], what="veth gone")
        assert host_state(second.net, kept)["netns"] is True  # adopted, not removed
        kept_addr = second.net.address(kept)
        table = sh("nft", "list", "table", "inet", second.net.table)  # replaced at set-up
        assert f"{kept_addr} . 0.0.0.0/0" in table  # with the adopted sandbox's allow-list
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


async def test_concurrent_creates_get_distinct_addresses(rt):
    ids = [new_id() for _ in range(6)]
    await asyncio.gather(*(rt.create(sid, SandboxSpec(network="bridge")) for sid in ids))
    addresses = {rt.net.address(sid) for sid in ids}
    assert None not in addresses and len(addresses) == len(ids)


async def test_stop_start_and_a_lost_namespace(rt, outside):
    sid, h = await started(rt, SandboxSpec(network="bridge"))
    target = f"{outside.allowed}:{OUT_PORT}"
    await rt.stop(sid)
    h = await rt.start(sid)
    assert reached((await probe(h, target))[target])
    await rt.stop(sid)
    sh("ip", "netns", "del", rt.net.netns(sid))  # what a reboot does to /run/netns
    h = await rt.start(sid)
    assert await interfaces(h) == ["eth0", "lo"]
    assert reached((await probe(h, target))[target])
