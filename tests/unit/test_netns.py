"""Egress allow-lists and network refusals, without touching the host's network."""

from __future__ import annotations

import ipaddress

import pytest

from rock_serve import errors
from rock_serve.config import (
    BridgeNetworkConfig,
    BwrapRuntimeConfig,
    LocalRuntimeConfig,
    parse_server_args,
)
from rock_serve.protocol import CreateSandboxRequest, SandboxSpec
from rock_serve.protocol.api import LIFECYCLE_FIELDS
from rock_serve.runtime._netns import BridgeNetwork, EgressRule, check_network, parse_egress


def names(host: str) -> list[str]:
    return {"pypi.example": ["192.0.2.7", "2001:db8::7"], "v6only.example": ["2001:db8::8"]}[host]


def net(**kwargs) -> BridgeNetwork:
    fields = {"bridge": "rkunit", "subnet": "10.215.7.0/24", "owner": "/state", "resolve": names}
    return BridgeNetwork(**{**fields, **kwargs})


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("10.0.0.0/8", ["10.0.0.0/8"]),
        ("10.1.2.3", ["10.1.2.3/32"]),
        ("10.1.2.3:443", ["10.1.2.3/32:443"]),
        ("10.1.2.0/24:53", ["10.1.2.0/24:53"]),
        ("pypi.example:443", ["192.0.2.7/32:443"]),  # its IPv6 address is left out
        ("pypi.example", ["192.0.2.7/32"]),
    ],
)
def test_parse_egress(entry, expected):
    assert [str(r) for r in parse_egress([entry], names)] == expected


@pytest.mark.parametrize(
    "entry",
    [
        "10.0.0.0/8:x",
        "10.0.0.1:0",
        "10.0.0.1:70000",
        "a b",
        "[pypi.example]:1",
        "x/8",
        "2001:db8::/32",
        "[2001:db8::1]:443",
        "v6only.example",
    ],
)
def test_parse_egress_refuses(entry):
    with pytest.raises(errors.InvalidRequest, match="egress"):
        parse_egress([entry], names)


def test_unresolvable_name_is_a_typed_error():
    with pytest.raises(errors.InvalidRequest, match="does not resolve"):
        parse_egress(["no-such-host.invalid"])
    assert [str(r) for r in parse_egress(["localhost:80"])] == ["127.0.0.1/32:80"]


def test_within():
    wide = EgressRule(ipaddress.ip_network("10.0.0.0/8"))
    port = EgressRule(ipaddress.ip_network("10.0.0.0/8"), 443)
    assert EgressRule(ipaddress.ip_network("10.1.0.0/16"), 22).within(wide)
    assert EgressRule(ipaddress.ip_network("10.1.0.0/16"), 443).within(port)
    assert not EgressRule(ipaddress.ip_network("10.1.0.0/16")).within(port)
    assert not EgressRule(ipaddress.ip_network("11.0.0.0/16")).within(wide)
    assert not EgressRule(ipaddress.ip_network("2001:db8::/32")).within(wide)


def test_check_keeps_a_spec_inside_the_workers_allow_list():
    bridge = net(egress_allow=["10.0.0.0/8", "192.0.2.0/24:443"])
    assert [str(r) for r in bridge.check(None)] == ["10.0.0.0/8", "192.0.2.0/24:443"]
    assert [str(r) for r in bridge.check(["10.9.0.0/16"])] == ["10.9.0.0/16"]
    with pytest.raises(errors.InvalidRequest, match="not allowed"):
        bridge.check(["192.0.2.7"])  # any port: wider than :443
    assert [str(r) for r in bridge.check(["pypi.example:443"])] == ["192.0.2.7/32:443"]
    assert bridge.check([]) == []


def test_sandbox_rules_reject_what_is_not_allowed():
    bridge = net(egress_deny=["169.254.0.0/16"])
    rules = bridge.sandbox_rules(bridge.check(["192.0.2.7:443"]))
    lines = [line.strip() for line in rules.splitlines()]
    deny = lines.index("ip daddr 169.254.0.0/16 reject with icmpx type admin-prohibited")
    subnet = lines.index("ip daddr 10.215.7.0/24 reject with icmpx type admin-prohibited")
    allow = lines.index("ip daddr 192.0.2.7/32 tcp dport 443 accept")
    assert deny < allow and subnet < allow
    assert "ip daddr 192.0.2.7/32 udp dport 443 accept" in lines
    assert lines[allow + 2] == "reject with icmpx type admin-prohibited"
    assert "type filter hook output priority filter; policy drop;" in lines


def test_host_rules_drop_everything_from_the_bridge_to_the_host():
    lines = [line.strip() for line in net(host_ports=[3128]).host_rules().splitlines()]
    assert 'iifname "rkunit" ip daddr 10.215.7.1 tcp dport { 3128 } accept' in lines
    assert lines.index('iifname "rkunit" drop') > lines.index(
        'iifname "rkunit" ip daddr 10.215.7.1 tcp dport { 3128 } accept'
    )
    assert 'iifname "rkunit" oifname "rkunit" drop' in lines
    assert 'iifname "rkunit" oifname "rkunit" accept' not in lines
    assert 'ip saddr 10.215.7.0/24 oifname != "rkunit" masquerade' in lines
    denied = [line.strip() for line in net(egress_deny=["169.254.0.0/16"]).host_rules().split("\n")]
    assert denied.index('iifname "rkunit" ip daddr 169.254.0.0/16 drop') < denied.index(
        'iifname "rkunit" accept'
    )
    open_ = [line.strip() for line in net(isolate=False).host_rules().splitlines()]
    assert open_.index('iifname "rkunit" oifname "rkunit" accept') < open_.index(
        'iifname "rkunit" oifname "rkunit" drop'
    )


def test_names_fit_the_kernel():
    bridge = net()
    sid = "sb-" + "w" * 16 + "-" + "r" * 32
    assert len(bridge.veth(sid)) <= 15
    assert bridge.veth(sid) != bridge.veth(sid + "x")
    assert bridge.netns_path(sid) == f"/run/netns/rkunit-{sid}"
    assert bridge.wrap(sid, ["bwrap", "x"])[:3] == [
        "nsenter",
        f"--net=/run/netns/rkunit-{sid}",
        "--",
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bridge": "a-name-too-long!"}, "bridge name"),
        ({"subnet": "10.0.0.1/24"}, "subnet"),
        ({"subnet": "10.0.0.0/30"}, "/29"),
        ({"subnet": "2001:db8::/64"}, "IPv4"),
        ({"egress_allow": ["nope nope"]}, "egress"),
    ],
)
def test_bad_bridge_config(kwargs, match):
    with pytest.raises(errors.InvalidConfig, match=match):
        net(**kwargs)


def test_check_network_refusals():
    with pytest.raises(errors.InvalidConfig, match="never"):
        check_network("host", None, net())
    with pytest.raises(errors.InvalidConfig, match="allow_network"):
        check_network("bridge", None, None)
    with pytest.raises(errors.InvalidRequest, match="egress needs"):
        check_network("none", ["10.0.0.0/8"], net())
    check_network("none", None, None)
    check_network("bridge", ["10.0.0.0/8"], net())


def test_wire_and_config_fields():
    spec = CreateSandboxRequest.model_validate({"network": "bridge", "egress": ["10.0.0.0/8"]})
    runtime_spec = SandboxSpec.model_validate(spec.model_dump(exclude=set(LIFECYCLE_FIELDS)))
    assert runtime_spec.egress == ["10.0.0.0/8"]
    schema = CreateSandboxRequest.model_json_schema()["properties"]["egress"]
    assert "allow-list" in schema["description"]
    with pytest.raises(ValueError, match="at most 64"):
        SandboxSpec(network="bridge", egress=["10.0.0.0/8"] * 65)
    args = parse_server_args(
        {"runtime": {"type": "bwrap", "allow_network": True, "bridge": {"name": "rk1"}}}
    )
    assert isinstance(args.runtime, BwrapRuntimeConfig)
    assert args.runtime.bridge == BridgeNetworkConfig(name="rk1")
    with pytest.raises(errors.InvalidConfig):
        parse_server_args({"runtime": {"type": "bwrap", "bridge": {"name": "x" * 13}}})


async def test_the_local_runtime_refuses_an_egress_it_cannot_enforce(tmp_path):
    runtime = LocalRuntimeConfig(state_dir=str(tmp_path)).build()
    try:
        with pytest.raises(errors.InvalidConfig, match="egress"):
            await runtime.create("t-egress", SandboxSpec(network="bridge", egress=["10.0.0.0/8"]))
        assert await runtime.list() == []
    finally:
        await runtime.close()


def test_host_elements_collapse_per_port():
    bridge = net()
    allow = bridge.check(["10.0.0.0/8", "10.1.0.0/16", "192.0.2.7:443", "192.0.2.0/24:443"])
    lines = bridge.host_elements("10.215.7.9", allow)
    assert lines == [
        "add element inet rock-rkunit known { 10.215.7.9 }",
        "add element inet rock-rkunit allow { 10.215.7.9 . 10.0.0.0/8 }",
        "add element inet rock-rkunit allow_port { 10.215.7.9 . 192.0.2.0/24 . tcp . 443, "
        "10.215.7.9 . 192.0.2.0/24 . udp . 443 }",
    ]
    assert bridge.host_elements("10.215.7.9", []) == [
        "add element inet rock-rkunit known { 10.215.7.9 }"
    ]
