"""Ray is not a back door: `rock up` opens no port beyond loopback, Ray needs its token, and
`rock down` leaves no Ray process.

One real `rock up` (its own Ray head on free ports, HOME, state file and temp dir in a temp
dir, serve_config.yaml with the local runtime, auth and audit as shipped) for the module; one
test checks the admin token `rock up` makes and runs `rock up` again, the last runs `rock down`.
The attacks of issue 11 item 6: Ray's ports from a non-loopback address (this machine's
external address, and a network namespace behind a veth pair, "another machine"), the
dashboard's job API without the token, ``ray.init("ray://...")`` without the token.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from rock_serve.auth import load_token_file, read_credentials
from rock_serve.sdk import Client
from rock_serve.sdk.cli._platform import _head_pids

from ..e2e._head import ROOT, free_ports

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

IP = shutil.which("ip") or "/usr/sbin/ip"
SS = shutil.which("ss") or "/usr/bin/ss"


@dataclass
class Up:
    env: dict[str, str]
    home: Path
    state_file: Path
    state_dir: Path  # the runtime's
    args: tuple[str, ...]  # of `rock up`
    dashboard: str
    api: str
    gcs: int
    client: int
    agent: int
    metrics: tuple[int, int]
    stdout: str

    @property
    def fixed_ports(self) -> set[int]:
        """The ports this head was told to use (Ray picks the others)."""
        dashboard = int(self.dashboard.rsplit(":", 1)[1])
        return {self.gcs, self.client, self.agent, dashboard, *self.metrics}

    def state(self) -> dict[str, object]:
        return dict(json.loads(self.state_file.read_text()))

    def pids(self) -> list[int]:
        state = self.state()
        return _head_pids(
            int(state["session"]),  # type: ignore[call-overload]
            str(state["marker"]),
            str(state["temp_dir"]),
        )

    @property
    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()

    @property
    def credentials(self) -> Path:
        return Path(self.env["ROCK_CREDENTIALS"])


def _rock(
    env: dict[str, str], *args: str, timeout: float = 400
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rock_serve.sdk.cli", *args],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    tmp = tmp_path_factory.mktemp("rock-up")
    home = tmp / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="rsp-", dir="/tmp")  # short: Ray's sockets live there
    gcs, dash, client, agent, http, grpc, metrics_a, metrics_b = free_ports(8)
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": http}
    config["grpc_options"]["port"] = grpc
    app = config["applications"][0]["args"]
    # Auth and audit as shipped (a token file in ~/.rock, made by `rock up`), paths moved here.
    assert config["http_options"]["host"] == "127.0.0.1"
    assert app["auth"]["token_file"] == "~/.rock/tokens.yaml"
    app["runtime"] = {"type": "local", "state_dir": str(tmp / "state")}
    app["namespace"] = "rock-sec-ray"
    app["auth"]["token_file"] = str(home / "tokens.yaml")
    app["audit"]["path"] = str(home / "audit.jsonl")
    path = tmp / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "HOME": str(home),
        "ROCK_STATE_FILE": str(home / ".rock" / "platform.json"),
        "ROCK_RAY_TEMP_DIR": temp_dir,
        "ROCK_CREDENTIALS": str(home / ".rock" / "credentials"),
        # What the test session runs with: `rock up` must turn token auth on regardless.
        "RAY_AUTH_MODE": "disabled",
        # Ray's two fixed metrics ports, free ones here (other heads on this machine use them).
        "AUTOSCALER_METRIC_PORT": str(metrics_a),
        "DASHBOARD_METRIC_PORT": str(metrics_b),
    }
    for var in ("RAY_ADDRESS", "ROCK_TOKEN", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    dashboard = f"http://127.0.0.1:{dash}"
    args = [
        "up",
        "--config",
        str(path),
        "--api",
        f"http://127.0.0.1:{http}",
        "--dashboard",
        dashboard,
        f"--ray-port={gcs}",
        f"--ray-client-port={client}",
        f"--dashboard-agent-port={agent}",
        "--timeout=300",
    ]
    result = _rock(env, *args)
    state_file = home / ".rock" / "platform.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        yield Up(
            env=env,
            home=home,
            state_file=state_file,
            state_dir=tmp / "state",
            args=tuple(args),
            dashboard=dashboard,
            api=f"http://127.0.0.1:{http}",
            gcs=gcs,
            client=client,
            agent=agent,
            metrics=(metrics_a, metrics_b),
            stdout=result.stdout,
        )
    finally:
        if state_file.exists():
            _rock(env, "down", "--dashboard", dashboard, timeout=200)
        if state.get("session"):  # whatever `rock down` left (a failing test says so)
            for pid in _head_pids(int(state["session"]), str(state["marker"]), temp_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _listening(pids: list[int]) -> list[tuple[str, str, int, str]]:
    """(proto, address, port, process) of every listening TCP/UDP socket of ``pids``."""
    out = subprocess.run(
        [SS, "-H", "-l", "-n", "-p", "-t", "-u"], capture_output=True, text=True, check=True
    ).stdout
    wanted = {f"pid={p}," for p in pids}
    found = []
    for line in out.splitlines():
        cols = line.split()
        if len(cols) < 6 or not any(w in cols[-1] for w in wanted):
            continue
        address, _, port = cols[4].rpartition(":")
        found.append((cols[0], address, int(port), cols[-1]))
    return found


def _is_loopback(address: str) -> bool:
    address = address.strip("[]").split("%")[0]
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # "*": every address
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _external_addresses() -> list[str]:
    out = subprocess.run(
        [IP, "-j", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for link in json.loads(out):
        for info in link.get("addr_info", []):
            ip = ipaddress.ip_address(info["local"])
            if not ip.is_loopback and not ip.is_link_local:
                found.append(str(ip))
    return found


def _connect(host: str, port: int) -> str:
    """``connected``, ``refused``, or the error a TCP connect to ``host:port`` gets."""
    try:
        with socket.create_connection((host, port), timeout=5):
            return "connected"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return repr(exc)


def _refused(host: str, port: int) -> bool:
    return _connect(host, port) == "refused"


@contextlib.contextmanager
def _open_listener() -> Iterator[int]:
    """A TCP listener on every address (the positive control: the paths tested do work)."""
    srv = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    srv.settimeout(30)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = srv.accept()
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(srv.getsockname()[1])
    finally:
        stop.set()
        srv.close()


def test_rock_up_prints_how_to_reach_the_dashboard(up: Up):
    token_file = up.home / ".ray" / "auth_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert len(up.token) >= 32
    assert "Ray token auth is on" in up.stdout
    assert str(token_file) in up.stdout
    assert f"ray://127.0.0.1:{up.client}" in up.stdout
    assert up.token not in up.stdout  # where the token is, never the token itself


def test_every_ray_socket_is_on_loopback(up: Up):
    pids = up.pids()
    sockets = _listening(pids)
    ports = {port for _, _, port, _ in sockets}
    # The head's fixed ports are among them: GCS, dashboard, Ray Client, dashboard agent...
    assert up.fixed_ports <= ports
    names = " ".join(proc for *_, proc in sockets)
    for process in ("gcs_server", "raylet", "DashboardA", "RuntimeEnv"):
        assert process in names
    exposed = [s for s in sockets if not _is_loopback(s[1])]
    assert exposed == [], exposed
    # The platform's actors (Admin replica, Scheduler, Worker) run in processes of this head.
    with httpx.Client(base_url=up.api, timeout=30) as api:
        assert api.get("/v1/health").json()["status"] == "ok"
    actors = [p for p in pids if b"ray::" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(actors) >= 3


def test_ray_ports_refuse_a_non_loopback_address(up: Up):
    ports = sorted({port for proto, _, port, _ in _listening(up.pids()) if proto == "tcp"})
    addresses = _external_addresses()
    assert addresses, "this machine has no non-loopback address"
    with _open_listener() as control:
        for address in addresses:
            assert _connect(address, control) == "connected"  # the address is reachable...
            outcomes = {port: _connect(address, port) for port in ports}
            assert set(outcomes.values()) == {"refused"}, (address, outcomes)  # ...Ray is not


def test_ray_ports_refuse_another_network_namespace(up: Up):
    """From a network namespace behind a veth pair (another host on a private network)."""
    ports = sorted({port for proto, _, port, _ in _listening(up.pids()) if proto == "tcp"})
    tag = secrets.token_hex(3)
    ns, host_if, ns_if = f"rsray-{tag}", f"rsh{tag}", f"rsn{tag}"
    subnet = 64 + secrets.randbelow(128)
    host_ip, ns_ip = f"10.{subnet}.{secrets.randbelow(250)}.1", None
    ns_ip = host_ip.rsplit(".", 1)[0] + ".2"
    probe = (
        "import socket,sys\n"
        "bad=[]\n"
        "for p in map(int, sys.argv[2:]):\n"
        "    s=socket.socket(); s.settimeout(5)\n"
        "    try: s.connect((sys.argv[1], p)); bad.append(p)\n"
        "    except ConnectionRefusedError: pass\n"
        "    except OSError as e: bad.append((p, repr(e)))\n"
        "    finally: s.close()\n"
        "print(bad)\n"
    )

    def ip(*args: str) -> None:
        subprocess.run([IP, *args], check=True, capture_output=True)

    ip("netns", "add", ns)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", ns, "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        ip("-n", ns, "link", "set", ns_if, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        with _open_listener() as control:
            run = [IP, "netns", "exec", ns, sys.executable, "-c", probe, host_ip]
            reachable = subprocess.run(
                [*run, str(control)], capture_output=True, text=True, check=True, timeout=60
            ).stdout
            assert reachable.strip() == f"[{control}]"  # the veth path works...
            result = subprocess.run(
                [*run, *map(str, ports)], capture_output=True, text=True, check=True, timeout=300
            ).stdout
            assert result.strip() == "[]", result  # ...and reaches no Ray port
    finally:
        subprocess.run([IP, "link", "del", host_if], capture_output=True, check=False)
        subprocess.run([IP, "netns", "del", ns], capture_output=True, check=False)


def test_dashboard_job_api_needs_the_token(up: Up):
    job = {"entrypoint": "id > /tmp/rock-sec-ray-pwned"}
    with httpx.Client(timeout=30) as http:
        assert http.post(f"{up.dashboard}/api/jobs/", json=job).status_code == 401
        wrong = {"Authorization": "Bearer " + "0" * 64}
        assert http.post(f"{up.dashboard}/api/jobs/", json=job, headers=wrong).status_code == 403
        agent = f"http://127.0.0.1:{up.agent}/api/job_agent/jobs/"
        assert http.post(agent, json=job).status_code == 401
        assert http.get(f"{up.dashboard}/api/jobs/").status_code == 401
        # The token opens it (so the refusals above are the token's doing).
        good = {"Authorization": f"Bearer {up.token}"}
        listed = http.get(f"{up.dashboard}/api/jobs/", headers=good)
        assert listed.status_code == 200
        assert listed.json() == []
    assert not Path("/tmp/rock-sec-ray-pwned").exists()


_CLIENT = """
import sys, ray
try:
    ray.init(sys.argv[1], logging_level="ERROR")
    print("CONNECTED", ray.get(ray.remote(lambda: 6 * 7).remote()))
except Exception as exc:
    print("REFUSED", type(exc).__name__, str(exc)[:500].replace("\\n", " "))
"""


def _ray_clients(up: Up, *envs: dict[str, str]) -> list[str]:
    """The last line each Ray client printed, one process per env, all at once."""
    base = {k: v for k, v in up.env.items() if not k.startswith("RAY_AUTH")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLIENT, f"ray://127.0.0.1:{up.client}"],
            env={**base, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env in envs
    ]
    out = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=300)
        finally:
            proc.kill()
        out.append(stdout.strip().splitlines()[-1] if stdout.strip() else stderr)
    return out


def test_ray_client_needs_the_token(up: Up, tmp_path):
    # The token of `rock up` (found in HOME) connects: the port is alive, the token decides.
    # Up to 3 tries: Ray's proxier starts a per-client server on a port of 23000-24000 that it
    # does not check is free, and other Ray heads on this machine use that range too.
    stranger = tmp_path / "stranger"  # a HOME without ~/.ray/auth_token
    stranger.mkdir()
    # A refusal is retried by Ray's client with backoff from this many seconds (default 5: the
    # two refusals took about a minute); the refusal itself is the same. The three clients run
    # at once (each spends most of its time importing Ray and backing off).
    quick = {"HOME": str(stranger), "RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "1"}
    wrong = {**quick, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64}
    token = {"RAY_AUTH_MODE": "token"}
    first, no_token, wrong_token = _ray_clients(up, token, quick, wrong)
    assert no_token.startswith("REFUSED"), no_token
    assert wrong_token.startswith("REFUSED"), wrong_token
    outcomes = [first]
    while outcomes[-1] != "CONNECTED 42" and len(outcomes) < 3:
        outcomes += _ray_clients(up, token)
    assert outcomes[-1] == "CONNECTED 42", outcomes


def test_rock_up_bootstraps_an_admin_token_and_a_second_up_keeps_it(up: Up, monkeypatch):
    """The shipped auth: `rock up` makes the token file (hashes) and the SDK's credentials."""
    token_file = up.home / "tokens.yaml"
    assert "admin token 'admin' saved" in up.stdout
    for private in (token_file, up.credentials):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    token = read_credentials(up.credentials, up.api)
    assert token is not None
    assert token not in token_file.read_text()
    (entry,) = load_token_file(token_file)
    assert (entry.name, entry.namespace, entry.admin) == ("admin", "default", True)

    # Anonymous callers are refused; the SDK finds the token in the credentials file.
    assert httpx.post(f"{up.api}/v1/sandboxes", json={}, timeout=30).status_code == 401
    monkeypatch.setenv("ROCK_CREDENTIALS", str(up.credentials))
    monkeypatch.delenv("ROCK_TOKEN", raising=False)
    with Client(up.api) as client:
        with client.sandbox(ttl_seconds=300) as sb:
            assert sb.run("echo with-auth").output == "with-auth\n"
            status = _rock(up.env, "status", "--api", up.api)
            assert status.returncode == 0, status.stdout + status.stderr
            assert sb.id in status.stdout
        client.create_sandbox(ttl_seconds=300)  # kept, for `rock down` to remove

    # A second `rock up` finds the head, keeps the working token and the head it started.
    again = _rock(up.env, *up.args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "saved" not in again.stdout
    assert read_credentials(up.credentials, up.api) == token
    assert up.state()["started_head"] is True
    audit = (up.home / "audit.jsonl").read_text().splitlines()
    assert [json.loads(x)["action"] for x in audit].count("create") == 2


def test_rock_down_leaves_no_ray_process(up: Up):
    state = up.state()
    assert state["started_head"] is True
    before = up.pids()
    assert len(before) >= 8
    headers = {"Authorization": f"Bearer {read_credentials(up.credentials, up.api)}"}
    listed = httpx.get(f"{up.api}/v1/sandboxes", headers=headers, timeout=30).json()["items"]
    result = _rock(up.env, "down", "--dashboard", up.dashboard, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopped the head rock up started" in result.stdout
    if listed:  # the sandbox the token test kept: removed through the API, nothing left on disk
        assert f"removed {len(listed)} sandbox(es)" in result.stdout
    assert not up.state_dir.exists() or not any(up.state_dir.iterdir())
    left = _head_pids(
        int(state["session"]),  # type: ignore[call-overload]
        str(state["marker"]),
        str(state["temp_dir"]),
    )
    assert left == []
    assert [p for p in before if Path(f"/proc/{p}").exists() and _alive_pid(p)] == []
    for port in sorted(up.fixed_ports):  # the Ray Client server's among them
        assert _refused("127.0.0.1", port), port
    assert not up.state_file.exists()


def _alive_pid(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2 :].split()[0] not in ("Z", "X")
