"""Network containment on docker: 'none' by default, 'host' only by an explicit admin flag, and
a bridge network guarded like bwrap's (real traffic between this machine's namespaces only).

The test makes its own docker bridge network (dockerd here runs with --bridge=none and
--iptables=false, so there is no default one, no NAT and no firewall of Docker's).
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from rock_serve import errors
from rock_serve.protocol import SandboxSpec
from tests.contract.conftest import docker_config, require_docker
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

pytestmark = [pytest.mark.docker]
__all__ = ["host_servers", "octet", "outside"]  # fixtures used here


def new_id() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def docker_net(octet):
    """A docker bridge network of this test: (name, bridge interface, subnet)."""
    require_docker()
    tag = uuid.uuid4().hex[:8]
    name, iface, subnet = f"rkt-{tag}", f"rktd{tag}", f"10.217.{octet}.0/24"
    sh(
        "docker", "network", "create", "--driver", "bridge", "--subnet", subnet,
        "-o", f"com.docker.network.bridge.name={iface}", name,
    )  # fmt: skip
    try:
        yield name, iface, subnet
    finally:
        subprocess.run(["docker", "network", "rm", name], capture_output=True, check=False)
        subprocess.run(
            ["nft", "delete", "table", "inet", f"rock-{iface}"], capture_output=True, check=False
        )


@pytest.fixture
async def drt(tmp_path, docker_net):
    rt = docker_config(str(tmp_path), allow_network=True, bridge_network=docker_net[0]).build()
    try:
        yield rt
    finally:
        for info in await rt.list():
            await rt.remove(info.id)
        await rt.close()


async def started(rt, spec: SandboxSpec):
    sid = new_id()
    await rt.create(sid, spec)
    return sid, await rt.start(sid)


def host_targets(gateway: str, outside, host_servers) -> list[str]:
    loop, anyaddr = host_servers
    return [
        f"127.0.0.1:{loop.port}",
        f"{gateway}:{anyaddr.port}",
        f"{outside.host_ip}:{anyaddr.port}",
    ]


async def test_docker_none_reaches_nothing(drt, outside, host_servers, octet):
    _, h = await started(drt, SandboxSpec())
    assert await interfaces(h) == ["lo"]
    targets = [f"{outside.allowed}:{OUT_PORT}", *host_targets(f"10.217.{octet}.1", outside,
                                                             host_servers)]  # fmt: skip
    verdicts = await probe(h, *targets)
    assert not any(reached(v) for v in verdicts.values()), verdicts


async def test_docker_bridge_is_guarded(drt, docker_net, outside, host_servers, octet):
    allowed = f"{outside.allowed}:{OUT_PORT}"
    _, h = await started(drt, SandboxSpec(network="bridge", egress=[allowed]))
    assert "eth0" in await interfaces(h)
    table = sh("nft", "list", "table", "inet", f"rock-{docker_net[1]}")
    assert f'iifname "{docker_net[1]}" drop' in table
    denied = [f"{outside.denied}:{OUT_PORT}", f"{outside.allowed}:{OTHER_PORT}"]
    hosts = host_targets(f"10.217.{octet}.1", outside, host_servers)
    verdicts = await probe(h, allowed, *denied, *hosts)
    assert verdicts[allowed] == f"OK outside-{outside.allowed}:{OUT_PORT}", verdicts
    for target in denied + hosts:
        assert not reached(verdicts[target]), (target, verdicts)


async def test_docker_bridge_default_allow_list_never_reaches_the_host(
    drt, outside, host_servers, octet
):
    _, h = await started(drt, SandboxSpec(network="bridge"))
    hosts = host_targets(f"10.217.{octet}.1", outside, host_servers)
    verdicts = await probe(h, f"{outside.denied}:{OTHER_PORT}", *hosts)
    assert reached(verdicts[f"{outside.denied}:{OTHER_PORT}"]), verdicts
    assert not any(reached(verdicts[t]) for t in hosts), verdicts


async def test_docker_host_network_needs_its_own_flag(drt):
    with pytest.raises(errors.InvalidConfig, match="allow_host_network"):
        await drt.create(new_id(), SandboxSpec(network="host"))
    with pytest.raises(errors.InvalidRequest, match="egress"):
        await drt.create(new_id(), SandboxSpec(egress=["10.0.0.0/8"]))
    assert await drt.list() == []


async def test_docker_containers_cannot_talk(drt, docker_net):
    def address(sid: str) -> str:
        return sh(
            "docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            drt.container_name(sid),
        ).strip()  # fmt: skip

    sid, h = await started(drt, SandboxSpec(network="bridge"))
    await serve_inside(h, address(sid))
    _, other = await started(drt, SandboxSpec(network="bridge"))
    target = f"{address(sid)}:9000"
    verdicts = await probe(other, target)
    assert not reached(verdicts[target]), verdicts


async def test_docker_refuses_an_allow_list_another_oci_runtime_would_bypass(tmp_path, docker_net):
    rt = docker_config(
        str(tmp_path), allow_network=True, bridge_network=docker_net[0], oci_runtime="runsc"
    ).build()
    try:
        with pytest.raises(errors.InvalidConfig, match="bypasses"):
            await rt.create(new_id(), SandboxSpec(network="bridge", egress=["10.0.0.0/8"]))
        assert await rt.list() == []
    finally:
        await rt.close()
