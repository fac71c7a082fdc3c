"""Network namespaces for sandboxes that ask for a network: a veth to a bridge, NAT, nftables.

A networked sandbox never shares the host's network namespace. For a sandbox ``<id>`` on the
bridge ``<br>`` (one per Worker config, set up by :meth:`BridgeNetwork.setup`):

- ``/run/netns/<br>-<id>`` is its network namespace (``ip netns add``). bwrap cannot join an
  existing namespace, so the sandbox's command is wrapped in ``nsenter --net=<that path>``
  (:meth:`BridgeNetwork.wrap`) before bwrap runs; bwrap then makes no namespace of its own.
- A veth pair: ``eth0`` inside, ``rk<hash>`` on the host, a port of ``<br>``. Ports are
  ``isolated`` (a kernel bridge feature), so two sandboxes cannot exchange frames, only talk to
  the bridge itself, which drops them (next point). ``eth0`` has the sandbox's address from the
  bridge's subnet (a lease file under ``/run/rock-serve/net/<br>/``) and a default route to the
  bridge's address.
- The host's table ``inet rock-<br>`` (one per bridge, replaced whole at setup) drops every
  packet that arrives from the bridge for the host itself (its loopback, its bridge address,
  every other address it has), except replies and the configured ``host_ports``; it forwards
  what the sandboxes send out (masqueraded), drops what they send to each other, and lets in
  only replies. ``route_localnet`` stays 0 on the bridge.
- The deny-list (``egress_deny``) is also dropped there, in the host's forward chain, and each
  sandbox's allow-list is kept there too (sets ``allow``/``allow_port`` keyed by its address,
  ``known`` for "has a list"): the policy holds even where the sandbox's own table is bypassed.
- The sandbox's own table ``inet rock`` (inside its namespace, gone with it) is the egress
  allow-list: loopback, replies and the allowed ``cidr[:port]`` entries pass; the deny-list,
  the bridge's subnet (the host and the other sandboxes) and everything else are rejected.
  Host names in an allow-list are resolved once, when the namespace is made. Sandbox code
  cannot change these rules: it has no ``CAP_NET_ADMIN`` over a namespace of the host's user
  namespace.

Removal deletes the namespace (the kernel then deletes the veth) and the lease (nothing else is
per sandbox), also for the leftovers of an earlier Worker whose sandboxes are gone
(:meth:`BridgeNetwork.cleanup`). Sandboxes get IPv4 only: the bridge has no IPv6 address and the
host forwards no IPv6 from it.
Everything is done with ``ip`` (iproute2), ``nft`` and ``nsenter``; all calls are blocking and
run off the event loop through ``run_sync`` by the caller.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rock_serve.config import BridgeNetworkConfig, EgressPolicyConfig
from rock_serve.errors import InvalidConfig, InvalidRequest, RuntimeUnavailable

__all__ = [
    "NETNS_DIR",
    "BridgeNetwork",
    "EgressRule",
    "check_network",
    "docker_guard",
    "enter",
    "for_runtime",
    "parse_egress",
]

log = logging.getLogger(__name__)

#: Where ``ip netns`` keeps the named namespaces.
NETNS_DIR = "/run/netns"
#: Where address leases live (tmpfs: gone after a reboot, like the namespaces).
LEASE_ROOT = "/run/rock-serve/net"
_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>\d+))?$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str], list[str]]


@dataclass(frozen=True)
class EgressRule:
    """One allow- or deny-list entry: a network and, optionally, one TCP/UDP port."""

    network: Network
    port: int | None = None

    def within(self, wider: EgressRule) -> bool:
        """True when every packet this rule allows is allowed by ``wider``."""
        if self.network.version != wider.network.version:
            return False
        if not self.network.subnet_of(wider.network):  # type: ignore[arg-type]
            return False
        return wider.port is None or wider.port == self.port

    def nft(self, verdict: str) -> list[str]:
        """The nftables rule(s) for this entry with ``verdict`` (accept, drop...)."""
        family = "ip" if self.network.version == 4 else "ip6"
        match = f"{family} daddr {self.network.with_prefixlen}"
        if self.port is None:
            return [f"{match} {verdict}"]
        return [f"{match} {proto} dport {self.port} {verdict}" for proto in ("tcp", "udp")]

    def __str__(self) -> str:
        net = self.network.with_prefixlen
        if self.port is None:
            return net
        return f"[{net}]:{self.port}" if self.network.version == 6 else f"{net}:{self.port}"


def _resolve(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InvalidRequest(f"egress host {host!r} does not resolve ({exc})") from None
    return sorted({str(info[4][0]) for info in infos})


def parse_egress(entries: Iterable[str], resolve: Resolver | None = None) -> list[EgressRule]:
    """Parse ``cidr``, ``addr``, ``host`` entries, each optionally with ``:port``.

    A host name is resolved now (``resolve``, default ``getaddrinfo``) into one rule per IPv4
    address. Sandboxes get IPv4 only (the bridge routes no IPv6), so IPv6 entries are refused.

    Raises:
        InvalidRequest: an entry that is not one of these forms, an IPv6 one, or a name that
            does not resolve to an IPv4 address.
    """
    resolve = resolve or _resolve
    out: list[EgressRule] = []
    for entry in entries:
        text = entry.strip()
        nets: list[Network] = []
        port: int | None = None
        try:
            nets = [ipaddress.ip_network(text, strict=False)]  # a bare v6 or any cidr
        except ValueError:
            m = _HOST_PORT.match(text)
            if m is None:
                raise InvalidRequest(f"egress entry {entry!r}: expected cidr|host[:port]") from None
            if m["port"] is not None:
                port = int(m["port"])
                if not 0 < port < 65536:
                    raise InvalidRequest(f"egress entry {entry!r}: port out of range") from None
            target = m["v6"] or m["host"]
            try:
                nets = [ipaddress.ip_network(target, strict=False)]
            except ValueError:
                if m["v6"] is not None or not _HOSTNAME.match(target) or "/" in target:
                    raise InvalidRequest(
                        f"egress entry {entry!r}: not an address, network or host name"
                    ) from None
                resolved = [ipaddress.ip_network(a, strict=False) for a in resolve(target)]
                nets = [n for n in resolved if n.version == 4]  # sandboxes get IPv4 only
                if not nets:
                    raise InvalidRequest(f"egress host {target!r} has no IPv4 address") from None
        if any(n.version == 6 for n in nets):
            raise InvalidRequest(f"egress entry {entry!r}: sandboxes get IPv4 only")
        out.extend(EgressRule(net, port) for net in nets)
    return out


def _run(argv: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        cmd = " ".join(argv)
        raise RuntimeUnavailable(f"{cmd} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _spawn(argv: Sequence[str], stdin: str) -> subprocess.Popen[str]:
    """Start ``argv`` with ``stdin`` already in its pipe (it must fit: < 64 KiB); see _reap."""
    data = stdin.encode()
    if len(data) >= 65536:
        raise RuntimeUnavailable(f"{argv[0]}: input too large to pipe ({len(data)} bytes)")
    r, w = os.pipe()
    try:
        os.write(w, data)
    finally:
        os.close(w)
    try:
        return subprocess.Popen(
            argv, stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    finally:
        os.close(r)


def _reap(proc: subprocess.Popen[str], check: bool = True) -> None:
    """Wait for a process of :func:`_spawn`; raise like :func:`_run` when it failed."""
    _, err = proc.communicate()
    if check and proc.returncode != 0:
        cmd = " ".join(map(str, proc.args))  # type: ignore[arg-type]
        raise RuntimeUnavailable(f"{cmd} failed ({proc.returncode}): {err.strip()}")


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class BridgeNetwork:
    """The bridge, NAT and firewall of one Worker, and a namespace per networked sandbox."""

    def __init__(
        self,
        *,
        bridge: str,
        subnet: str,
        owner: str,
        egress_allow: Sequence[str] = ("0.0.0.0/0",),
        egress_deny: Sequence[str] = (),
        host_ports: Sequence[int] = (),
        isolate: bool = True,
        gateway: str | None = None,
        resolve: Resolver | None = None,
    ) -> None:
        if not _IFNAME.match(bridge):
            raise InvalidConfig(f"bridge name {bridge!r}: 1-15 characters [A-Za-z0-9_.-]")
        try:
            net = ipaddress.ip_network(subnet, strict=True)
        except ValueError as exc:
            raise InvalidConfig(f"bridge subnet {subnet!r}: {exc}") from None
        if not isinstance(net, ipaddress.IPv4Network) or net.prefixlen > 29:
            raise InvalidConfig(f"bridge subnet {subnet!r}: an IPv4 network of /29 or wider")
        self.bridge = bridge
        self.subnet = net
        try:
            self.gateway = ipaddress.IPv4Address(gateway or net.network_address + 1)
        except ValueError as exc:
            raise InvalidConfig(f"bridge gateway {gateway!r}: {exc}") from None
        if self.gateway not in net:
            raise InvalidConfig(f"bridge gateway {gateway} is not in {subnet}")
        self.owner = owner
        self.resolve = resolve or _resolve
        try:
            self.egress_allow = parse_egress(egress_allow, self.resolve)
            self.egress_deny = parse_egress(egress_deny, self.resolve)
        except InvalidRequest as exc:
            raise InvalidConfig(str(exc)) from None
        self.host_ports = sorted(set(host_ports))
        self.isolate = isolate
        self.table = f"rock-{bridge}"
        self.lease_dir = os.path.join(LEASE_ROOT, bridge)

    # ------------------------------------------------------------------ names

    def netns(self, sandbox_id: str) -> str:
        """Name of the sandbox's network namespace."""
        return f"{self.bridge}-{sandbox_id}"

    def netns_path(self, sandbox_id: str) -> str:
        """Path of the sandbox's network namespace (what ``nsenter --net`` takes)."""
        return os.path.join(NETNS_DIR, self.netns(sandbox_id))

    def veth(self, sandbox_id: str) -> str:
        """Host-side name of the sandbox's veth (15 characters at most)."""
        digest = hashlib.sha1(f"{self.bridge}/{sandbox_id}".encode()).hexdigest()
        return "rk" + digest[:13]

    def wrap(self, sandbox_id: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the sandbox's network namespace."""
        return ["nsenter", f"--net={self.netns_path(sandbox_id)}", "--", *argv]

    # ------------------------------------------------------------------ host side

    def setup(self) -> None:
        """Create the bridge if missing and (re)install the host's table for it. Idempotent."""
        if shutil.which("ip") is None:
            raise InvalidConfig("networked sandboxes need 'ip' (iproute2)")
        batch = [f"addr replace {self.gateway}/{self.subnet.prefixlen} dev {self.bridge}"]
        if not os.path.isdir(f"/sys/class/net/{self.bridge}"):
            batch.insert(0, f"link add {self.bridge} type bridge")
        _run(["ip", "-b", "-"], "\n".join(batch) + "\n")
        with contextlib.suppress(OSError):  # no IPv6 at all (no link-local address to reach)
            _write_sysctl(f"/proc/sys/net/ipv6/conf/{self.bridge}/disable_ipv6", "1")
        _run(["ip", "link", "set", self.bridge, "up"])
        self.guard()
        os.makedirs(self.lease_dir, mode=0o700, exist_ok=True)

    def guard(self) -> None:
        """Install the host's table for the bridge (made by us or by Docker). Idempotent.

        Raises:
            InvalidConfig: ``ip``, ``nft`` or ``nsenter`` is missing.
        """
        for tool in ("ip", "nft", "nsenter"):
            if shutil.which(tool) is None:
                raise InvalidConfig(f"networked sandboxes need {tool!r} (iproute2, nftables)")
        conf = f"/proc/sys/net/ipv4/conf/{self.bridge}"
        if os.path.isdir(conf):
            _write_sysctl(f"{conf}/route_localnet", "0")
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            forwarding = f.read().strip() == "1"
        if not forwarding:
            log.warning("net.ipv4.ip_forward was 0: enabling it for sandbox egress")
            _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
        with open("/proc/sys/net/ipv4/conf/all/route_localnet") as f:
            if f.read().strip() != "0":
                log.warning("net.ipv4.conf.all.route_localnet is 1; table %s drops it", self.table)
        _run(["nft", "-f", "-"], self.host_rules())

    def host_rules(self) -> str:
        """The host's nftables table for this bridge (replaces an earlier one atomically).

        The per-sandbox allow-lists of sandboxes that still have a namespace (their lease
        files hold them) are put back in the same transaction.
        """
        br, net = self.bridge, self.subnet.with_prefixlen
        elements = "\n".join(
            line
            for addr, (_owner, sid) in sorted(self._leases().items())
            if os.path.exists(os.path.join(NETNS_DIR, f"{self.bridge}-{sid}"))
            for line in self._read_elements(addr)
        )
        ports = ", ".join(str(p) for p in self.host_ports)
        allow_ports = (
            f'iifname "{br}" ip daddr {self.gateway} tcp dport {{ {ports} }} accept'
            if self.host_ports
            else ""
        )
        between = "" if self.isolate else f'iifname "{br}" oifname "{br}" accept'
        # The deny-list again on the host: it holds even where a sandbox's own table does not
        # see its packets (gVisor's netstack writes to its veth through a packet socket).
        deny = "\n        ".join(
            f'iifname "{br}" {line}' for rule in self.egress_deny for line in rule.nft("drop")
        )
        return f"""
table inet {self.table}
delete table inet {self.table}
table inet {self.table} {{
    set allow {{ type ipv4_addr . ipv4_addr; flags interval; }}
    set allow_port {{ type ipv4_addr . ipv4_addr . inet_proto . inet_service; flags interval; }}
    set known {{ type ipv4_addr; }}
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        iifname "{br}" ct state established,related accept
        {allow_ports}
        iifname "{br}" drop
        ip saddr {net} drop
    }}
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        {between}
        iifname "{br}" oifname "{br}" drop
        iifname "{br}" ip saddr != {net} drop
        iifname "{br}" meta nfproto ipv6 drop
        {deny}
        iifname "{br}" ip saddr . ip daddr @allow accept
        iifname "{br}" ip saddr . ip daddr . meta l4proto . th dport @allow_port accept
        iifname "{br}" ip saddr @known reject with icmpx type admin-prohibited
        iifname "{br}" accept
        oifname "{br}" ct state established,related accept
        oifname "{br}" drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {net} oifname != "{br}" masquerade
    }}
}}
{elements}
"""

    def teardown(self) -> None:
        """Remove the host's table and the bridge (tests; a Worker leaves them in place)."""
        _run(["nft", "delete", "table", "inet", self.table], check=False)
        _run(["ip", "link", "del", self.bridge], check=False)
        with contextlib.suppress(OSError):
            os.rmdir(self.lease_dir)

    # ------------------------------------------------------------------ leases

    def _lease(self, sandbox_id: str) -> str:
        """The sandbox's address: its existing lease, or the first free one (taken now)."""
        found = self.address(sandbox_id)
        if found is not None:
            return found
        os.makedirs(self.lease_dir, mode=0o700, exist_ok=True)
        hosts = self.subnet.num_addresses - 3  # minus network, gateway, broadcast
        start = int(hashlib.sha1(sandbox_id.encode()).hexdigest(), 16) % hosts
        base = int(self.subnet.network_address) + 2
        for i in range(hosts):
            addr = str(ipaddress.IPv4Address(base + (start + i) % hosts))
            try:
                fd = os.open(
                    os.path.join(self.lease_dir, addr), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
                )
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{self.owner}\n{sandbox_id}\n")
            link = self._index(sandbox_id)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)  # a stale index entry (its lease is gone)
            os.symlink(addr, link)
            return addr
        raise RuntimeUnavailable(f"bridge {self.bridge}: no free address in {self.subnet}")

    def _index(self, sandbox_id: str) -> str:
        """Symlink ``id-<hash of owner and id>`` -> the address: finds a lease without a scan."""
        key = hashlib.sha1(f"{self.owner}\n{sandbox_id}".encode()).hexdigest()[:32]
        return os.path.join(self.lease_dir, f"id-{key}")

    def host_elements(self, addr: str, allow: Sequence[EgressRule]) -> list[str]:
        """``add element`` lines of the host's copy of a sandbox's allow-list.

        Networks are collapsed per port (an interval set refuses overlapping elements).
        """
        by_port: dict[int | None, list[ipaddress.IPv4Network]] = {}
        for rule in allow:
            if isinstance(rule.network, ipaddress.IPv4Network):
                by_port.setdefault(rule.port, []).append(rule.network)
        plain, ported = [], []
        for port, nets in sorted(by_port.items(), key=lambda kv: kv[0] or 0):
            for net in ipaddress.collapse_addresses(nets):
                if port is None:
                    plain.append(f"{addr} . {net.with_prefixlen}")
                else:
                    ported += [
                        f"{addr} . {net.with_prefixlen} . {p} . {port}" for p in ("tcp", "udp")
                    ]
        lines = [f"add element inet {self.table} known {{ {addr} }}"]
        if plain:
            lines.append(f"add element inet {self.table} allow {{ {', '.join(plain)} }}")
        if ported:
            lines.append(f"add element inet {self.table} allow_port {{ {', '.join(ported)} }}")
        return lines

    def _read_elements(self, addr: str) -> list[str]:
        try:
            with open(os.path.join(self.lease_dir, addr)) as f:
                lines = f.read().split("\n")[2:]
        except OSError:
            return []
        prefix = f"add element inet {self.table} "
        return [line for line in lines if line.startswith(prefix)]

    def _write_lease(self, addr: str, sandbox_id: str, elements: Sequence[str]) -> None:
        path = os.path.join(self.lease_dir, addr)
        tmp = f"{path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join([self.owner, sandbox_id, *elements, ""]))
        os.replace(tmp, path)

    def _read_lease(self, addr: str) -> tuple[str, str] | None:
        try:
            with open(os.path.join(self.lease_dir, addr)) as f:
                owner, sid = (f.read().split("\n") + ["", ""])[:2]
        except OSError:
            return None
        return owner, sid

    def _leases(self) -> dict[str, tuple[str, str]]:
        """Map each leased address to its (owner, sandbox id)."""
        out: dict[str, tuple[str, str]] = {}
        try:
            names = os.listdir(self.lease_dir)
        except FileNotFoundError:
            return out
        for name in names:
            skip = name.startswith("id-") or name.endswith(".tmp")
            lease = None if skip else self._read_lease(name)
            if lease is not None:
                out[name] = lease
        return out

    def address(self, sandbox_id: str) -> str | None:
        """The sandbox's leased address, if it has one."""
        try:
            addr = os.readlink(self._index(sandbox_id))
        except OSError:
            return None
        return addr if self._read_lease(addr) == (self.owner, sandbox_id) else None

    # ------------------------------------------------------------------ per sandbox

    def check(self, egress: Sequence[str] | None) -> list[EgressRule]:
        """The sandbox's allow-list: its own entries (all within ``egress_allow``) or that list.

        Raises:
            InvalidRequest: a malformed entry, or one wider than this Worker allows.
        """
        if egress is None:
            return list(self.egress_allow)
        rules = parse_egress(egress, self.resolve)
        for rule in rules:
            if not any(rule.within(w) for w in self.egress_allow):
                allowed = ", ".join(str(w) for w in self.egress_allow) or "nothing"
                raise InvalidRequest(f"egress {rule} is not allowed here (allowed: {allowed})")
        return rules

    def sandbox_rules(self, allow: Sequence[EgressRule]) -> str:
        """The nftables table inside a sandbox's namespace: the egress allow-list."""
        lines = ['oifname "lo" accept', "ct state established,related accept"]
        lines += (
            [
                f"tcp dport {{ {', '.join(map(str, self.host_ports))} }} ip daddr "
                f"{self.gateway} accept"
            ]
            if self.host_ports
            else []
        )
        for rule in self.egress_deny:
            lines += rule.nft("reject with icmpx type admin-prohibited")
        if self.isolate:
            lines.append(
                f"ip daddr {self.subnet.with_prefixlen} reject with icmpx type admin-prohibited"
            )
        else:
            lines.append(f"ip daddr {self.gateway} reject with icmpx type admin-prohibited")
            lines.append(f"ip daddr {self.subnet.with_prefixlen} accept")
        for rule in allow:
            lines += rule.nft("accept")
        lines.append("reject with icmpx type admin-prohibited")
        inbound = ['iifname "lo" accept', "ct state established,related accept"]
        if not self.isolate:
            inbound.append(f"ip saddr {self.subnet.with_prefixlen} accept")
        body = "\n        ".join(lines)
        ins = "\n        ".join(inbound)
        return f"""
table inet rock {{
    chain output {{
        type filter hook output priority filter; policy drop;
        {body}
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        {ins}
    }}
}}
"""

    def create(self, sandbox_id: str, egress: Sequence[str] | None) -> str:
        """Make the sandbox's namespace, veth, address, route and rules; return its address.

        Raises:
            InvalidRequest: a bad allow-list (nothing is made then).
            RuntimeUnavailable: ``ip`` or ``nft`` failed (what was made is removed).
        """
        allow = self.check(egress)
        addr = self._lease(sandbox_id)
        name, veth = self.netns(sandbox_id), self.veth(sandbox_id)
        if os.path.isdir(f"/sys/class/net/{veth}"):  # of the same id, removed a moment ago
            _run(["ip", "link", "del", veth], check=False)
        elements = self.host_elements(addr, allow)
        stale = self._drop_elements(addr)  # of an earlier namespace of this sandbox, if any
        if stale is not None:
            _reap(stale, check=False)  # absent: nothing to delete
        self._write_lease(addr, sandbox_id, elements)  # first: remove() finds them
        # The host's copy of the allow-list needs no namespace: load it meanwhile.
        host_copy = _spawn(["nft", "-f", "-"], "\n".join(elements) + "\n")
        try:
            host = [
                f"netns add {name}",
                f"link add {veth} type veth peer name eth0 netns {name}",
                f"link set {veth} master {self.bridge}",
                f"link set dev {veth} type bridge_slave isolated {'on' if self.isolate else 'off'}"
                " learning off",
                f"link set {veth} up",
            ]
            _run(["ip", "-b", "-"], "\n".join(host) + "\n")
            inside = [
                "link set lo up",
                f"addr add {addr}/{self.subnet.prefixlen} dev eth0",
                "link set eth0 up",
                f"route add default via {self.gateway}",
            ]
            _run(["ip", "-n", name, "-b", "-"], "\n".join(inside) + "\n")
            self.apply(self.netns_path(sandbox_id), allow)
        except BaseException:
            with contextlib.suppress(Exception):
                _reap(host_copy, check=False)
                self.remove(sandbox_id)
            raise
        try:
            _reap(host_copy)
        except BaseException:
            with contextlib.suppress(Exception):
                self.remove(sandbox_id)
            raise
        return addr

    def _drop_elements(self, addr: str) -> subprocess.Popen[str] | None:
        """Delete the host's copy of the allow-list leased with ``addr``, if it has one.

        Returns the running ``nft`` (for the caller to :func:`_reap`), or None.
        """
        lines = self._read_elements(addr)
        if not lines:
            return None
        batch = "\n".join(line.replace("add element", "delete element", 1) for line in lines)
        return _spawn(["nft", "-f", "-"], batch + "\n")

    def apply(self, netns_path: str, allow: Sequence[EgressRule]) -> None:
        """Load the allow-list table into the namespace at ``netns_path`` (replacing it)."""
        rules = "table inet rock\ndelete table inet rock\n" + self.sandbox_rules(allow)
        _run(["nsenter", f"--net={netns_path}", "nft", "-f", "-"], rules)

    def ensure(self, sandbox_id: str, egress: Sequence[str] | None) -> None:
        """Re-create the namespace if it is gone (after a reboot); no-op otherwise."""
        if not os.path.exists(self.netns_path(sandbox_id)):
            self.create(sandbox_id, egress)

    def remove(self, sandbox_id: str) -> None:
        """Delete the namespace and the lease. Idempotent.

        The kernel destroys the namespace, and with it both ends of the veth and the
        sandbox's table, once its last process is gone (the caller killed them): that happens
        in the background, a few ms later (an ``ip link del`` first would wait ~30 ms for it).
        """
        addr = self.address(sandbox_id)
        dropping = self._drop_elements(addr) if addr is not None else None  # runs meanwhile
        try:
            if os.path.exists(self.netns_path(sandbox_id)):
                _run(["ip", "netns", "del", self.netns(sandbox_id)])
        finally:
            if dropping is not None:
                _reap(dropping, check=False)  # absent (a replaced table): nothing to delete
        if addr is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.lease_dir, addr))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._index(sandbox_id))

    def cleanup(self, alive: Callable[[str], bool]) -> list[str]:
        """Remove the namespaces and leases of this owner's sandboxes for which not ``alive``."""
        removed = []
        for _addr, (owner, sid) in sorted(self._leases().items()):
            if owner == self.owner and not alive(sid):
                try:
                    self.remove(sid)
                except RuntimeUnavailable as exc:
                    log.warning("cannot remove the network of %s: %s", sid, exc)
                    continue
                removed.append(sid)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.lease_dir):
                link = os.path.join(self.lease_dir, name)
                if name.startswith("id-") and not os.path.exists(link):
                    os.unlink(link)  # its lease is gone
        return removed


def for_runtime(config: BridgeNetworkConfig, owner: str) -> BridgeNetwork:
    """The bridge of a runtime whose sandboxes live in ``owner`` (a state dir), set up.

    Leftovers of sandboxes that are gone from ``owner`` (an earlier Worker crashed before
    removing them) are removed here.
    """
    net = BridgeNetwork(
        bridge=config.name,
        subnet=config.subnet,
        owner=owner,
        egress_allow=config.egress_allow,
        egress_deny=config.egress_deny,
        host_ports=config.host_ports,
        isolate=config.isolate,
    )
    net.setup()
    gone = net.cleanup(lambda sid: os.path.exists(os.path.join(owner, sid, "meta.json")))
    if gone:
        log.info("removed the networks of %d sandboxes that are gone: %s", len(gone), gone)
    return net


def check_network(
    network: str, egress: Sequence[str] | None, net: BridgeNetwork | None, host_ok: bool = False
) -> None:
    """Refuse a spec's network before anything is made.

    Raises:
        InvalidConfig: a network this runtime does not give ('host' unless ``host_ok``;
            'bridge' only with allow_network).
        InvalidRequest: egress without network 'bridge', or an allow-list ``net`` refuses.
    """
    if network in ("none", "host") and egress is not None:
        raise InvalidRequest(f"egress needs network 'bridge' (not {network!r})")
    if network == "none" or (network == "host" and host_ok):
        return
    if network == "host":
        raise InvalidConfig(
            "network 'host' (the host's own namespace, with its loopback services) is never "
            "given to a sandbox here; use 'bridge'"
        )
    if net is None:
        raise InvalidConfig(
            f"network {network!r} is not allowed by this runtime (allow_network=false)"
        )
    net.check(egress)


def enter(net: BridgeNetwork | None, sandbox_id: str, network: str, argv: list[str]) -> list[str]:
    """``argv`` as is for network 'none' (bwrap unshares it), else inside the sandbox's netns."""
    if network == "none":
        return argv
    if net is None:
        raise InvalidConfig(f"network {network!r} is not allowed by this runtime")
    return net.wrap(sandbox_id, argv)


#: Interface option of a docker bridge network.
_DOCKER_BRIDGE_NAME = "com.docker.network.bridge.name"


def docker_guard(network: dict[str, Any], policy: EgressPolicyConfig, owner: str) -> BridgeNetwork:
    """Guard a Docker bridge network (``docker network inspect`` data) like our own bridge.

    The host's table for its interface is installed now; each container's allow-list is loaded
    with :meth:`BridgeNetwork.apply` once it runs.

    Raises:
        InvalidConfig: not a bridge network, or one without an IPv4 subnet.
    """
    name = network.get("Name", "?")
    if network.get("Driver") != "bridge":
        raise InvalidConfig(f"docker network {name!r} is not a bridge network")
    options = network.get("Options") or {}
    iface = options.get(_DOCKER_BRIDGE_NAME) or (
        "docker0" if name == "bridge" else "br-" + str(network.get("Id", ""))[:12]
    )
    v4 = [
        c
        for c in (network.get("IPAM") or {}).get("Config") or []
        if "." in str(c.get("Subnet", ""))
    ]
    if not v4:
        raise InvalidConfig(f"docker network {name!r} has no IPv4 subnet")
    net = BridgeNetwork(
        bridge=iface,
        subnet=str(ipaddress.ip_network(v4[0]["Subnet"], strict=False)),
        gateway=v4[0].get("Gateway") or None,
        owner=owner,
        egress_allow=policy.egress_allow,
        egress_deny=policy.egress_deny,
        host_ports=policy.host_ports,
        isolate=policy.isolate,
    )
    net.guard()
    return net
