"""``rock up|down|status``: run the platform on a local Ray head through Ray's own CLIs.

Nothing here imports ``ray``: the CLI talks to Ray through ``ray``/``serve`` subprocesses and to
the platform through its HTTP API, so it works from any Python that has rock-serve installed.

Auth: when the deployed config sets ``auth.token_file``, ``rock up`` makes sure the SDK's
credentials file (``~/.rock/credentials`` or ``ROCK_CREDENTIALS``) holds an admin token for
the API that the token file accepts, creating both (mode 0600) as needed, before deploying.
``status`` and ``down`` send that token (or ``ROCK_TOKEN``).

Ray is no back door: the head ``rock up`` starts is a single node on loopback, with Ray's own
token auth on (``RAY_AUTH_MODE=token``). Every Ray port (GCS, raylet, object manager, Ray
Client server, dashboard, dashboard agent, runtime-env agent, metrics, core workers) listens
on 127.0.0.1 only: ``ray start`` turns ``--node-ip-address=127.0.0.1`` into the machine's
external address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` says "no cluster", so both
are set. The Ray token lives where Ray looks for it (``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``, created mode 0600 if missing): the
dashboard's job API, the Ray Client (``ray://``) and every Ray gRPC port refuse callers
without it.

``rock down`` stops every process of that head: ``ray start`` runs in a session of its own,
and its environment carries a marker (``ROCK_UP_ID``) that every Ray process inherits; down
signals the processes of that session, with that marker or with the head's temp dir in their
command line, then checks that none is left.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from rock_serve.auth import (
    TokenTable,
    credentials_path,
    generate_token,
    hash_token,
    load_token_file,
    read_credentials,
    save_token_file,
    write_credentials,
)
from rock_serve.config import TokenEntry
from rock_serve.errors import InvalidConfig
from rock_serve.sdk._base import ClientSettings

#: Where ``rock up`` keeps what it started, so ``rock down`` stops only that.
STATE_FILE = Path(os.environ.get("ROCK_STATE_FILE", Path.home() / ".rock" / "platform.json"))
#: Ray's temp dir for a head started by ``rock up`` (a short path: Ray's sockets live in it).
RAY_TEMP_DIR = os.environ.get("ROCK_RAY_TEMP_DIR", "/tmp/rock-ray")
#: The environment variable every process of a head ``rock up`` started carries.
MARKER = "ROCK_UP_ID"


@dataclass(frozen=True)
class RayPorts:
    """The fixed ports of a head ``rock up`` starts (Ray picks the others, on loopback)."""

    gcs: int = 6379
    client: int = 10001
    dashboard_agent: int = 52365


@dataclass
class Endpoints:
    """Where the platform answers."""

    api: str
    dashboard: str
    #: The Ray token's file (None: from ``RAY_AUTH_TOKEN``, or the head is not token-protected).
    ray_token_file: Path | None = None
    #: The Ray Client address of a head ``rock up`` started.
    ray_client: str | None = None
    #: The head runs with Ray's token auth on.
    ray_auth: bool = False


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"rock: '{name}' not found; install rock-serve[server]")
    return found


def ray_token_file() -> Path:
    """Where Ray reads its auth token: ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).expanduser() if path else Path.home() / ".ray" / "auth_token"


def ray_token() -> str | None:
    """The Ray auth token this process would send (``RAY_AUTH_TOKEN`` or the token file)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    try:
        return ray_token_file().read_text().strip() or None
    except OSError:
        return None


def ensure_ray_token() -> Path | None:
    """Make sure a Ray auth token exists; create the token file (mode 0600) if not.

    Returns the token file, or None when the token comes from ``RAY_AUTH_TOKEN``.
    """
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return None
    path = ray_token_file()
    if ray_token() is None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    os.chmod(path, 0o600)
    return path


def _ray_headers() -> dict[str, str]:
    token = ray_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _env(ray_auth: bool | None = None) -> dict[str, str]:
    """The environment of Ray's CLIs: token mode for a token-protected head.

    ``ray_auth=None`` (the head's mode is unknown) keeps the caller's ``RAY_AUTH_MODE``, or
    ``disabled``.
    """
    env = dict(os.environ)
    if ray_auth:
        env["RAY_AUTH_MODE"] = "token"
        if not env.get("RAY_AUTH_TOKEN"):
            env["RAY_AUTH_TOKEN_PATH"] = str(ray_token_file())
    elif ray_auth is None:
        env.setdefault("RAY_AUTH_MODE", "disabled")
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def _run(
    argv: list[str], *, timeout: float, ray_auth: bool | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=_env(ray_auth), capture_output=True, text=True, timeout=timeout, check=False
    )


#: What ``serve deploy`` prints when the dashboard dropped or refused its request (seen on 2 busy
#: cores). The PUT is declarative (the same config twice is one deployment), so it is sent again.
_DROPPED = ("Connection aborted", "RemoteDisconnected", "Connection refused", "Connection reset")


def serve_deploy(
    config: Path,
    dashboard: str,
    *,
    timeout: float,
    ray_auth: bool | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``serve deploy config`` against ``dashboard``; resent (backoff 1-8 s) while the dashboard
    drops the connection, until ``timeout``. Returns the last attempt.

    Args:
        config: The Serve config file.
        dashboard: The head's dashboard URL.
        timeout: Seconds for every attempt together.
        ray_auth: Whether to send Ray's token (with ``env`` None).
        env: The environment to run in (default: this process's, with Ray's token as asked).
        cwd: Working directory.
    """
    deadline = time.monotonic() + timeout
    delay = 1.0
    while True:
        res = subprocess.run(
            [_bin("serve"), "deploy", str(config), "-a", dashboard],
            env=env if env is not None else _env(ray_auth),
            capture_output=True,
            text=True,
            timeout=max(1.0, deadline - time.monotonic()),
            cwd=cwd,
            check=False,
        )
        dropped = res.returncode != 0 and any(m in res.stderr for m in _DROPPED)
        if not dropped or time.monotonic() + delay >= deadline:
            return res
        time.sleep(delay)
        delay = min(2 * delay, 8.0)


def _head_auth(dashboard: str) -> bool | None:
    """Whether the head at ``dashboard`` needs Ray's token (None: no head answers)."""
    try:
        code = httpx.get(f"{dashboard}/api/version", timeout=2).status_code
    except httpx.HTTPError:
        return None
    if code in (401, 403):
        return True
    return False if code == 200 else None


def _head_running(dashboard: str) -> bool:
    return _head_auth(dashboard) is not None


def _port_of(url: str) -> int:
    port = httpx.URL(url).port
    if port is None:
        raise SystemExit(f"rock: {url!r} names no port")
    return port


def _start_head(dashboard: str, ports: RayPorts, timeout: float) -> tuple[int, str]:
    """``ray start --head`` on loopback with Ray's token auth, in a session of its own.

    Returns the session id (the pid of ``ray start``) and the marker its processes carry.
    """
    host = httpx.URL(dashboard).host
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"rock: a head rock up starts has its dashboard on 127.0.0.1, not {host}")
    ensure_ray_token()
    marker = secrets.token_hex(8)
    env = _env(ray_auth=True)
    # Without this, `ray start` turns --node-ip-address=127.0.0.1 into the external address
    # and binds GCS, raylet and the Ray Client server there (and on 0.0.0.0).
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env[MARKER] = marker
    env.pop("RAY_ADDRESS", None)
    argv = [
        _bin("ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={ports.gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={_port_of(dashboard)}",
        f"--ray-client-server-port={ports.client}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent}",
        f"--temp-dir={RAY_TEMP_DIR}",
        "--disable-usage-stats",
    ]
    log_path = STATE_FILE.parent / "ray-start.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        # A session of its own: every Ray process it starts keeps that session id.
        proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
    if code != 0:
        _stop_pids(_head_pids(proc.pid, marker, RAY_TEMP_DIR))
        tail = log_path.read_text(errors="replace")[-2000:]
        raise SystemExit(f"rock: ray start failed (see {log_path}):\n{tail}")
    return proc.pid, marker


def _headers(api: str) -> dict[str, str]:
    """The Authorization header for ``api`` (``ROCK_TOKEN`` or the credentials file), if any."""
    token = ClientSettings.from_env(base_url=api).token
    return {"Authorization": f"Bearer {token}"} if token else {}


def _token_file(config: Path) -> Path | None:
    """The ``auth.token_file`` of the rock-serve app in a Serve config, unless auth is off."""
    try:
        data = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None  # serve deploy reports it
    for application in data.get("applications") or []:
        if application.get("import_path") != "rock_serve.deployments.app:build_app":
            continue
        auth = (application.get("args") or {}).get("auth") or {}
        if auth.get("mode") != "disabled" and auth.get("token_file"):
            return Path(str(auth["token_file"])).expanduser()
    return None


def ensure_admin_token(token_file: Path, api: str) -> str | None:
    """Make sure the credentials file holds an admin token for ``api`` that ``token_file``
    accepts; add one to both (mode 0600) if not. Returns the new token's name, or None.
    """
    try:
        entries = load_token_file(token_file) if token_file.exists() else []
    except InvalidConfig as exc:
        raise SystemExit(f"rock: {exc}") from None
    credentials = credentials_path()
    saved = read_credentials(credentials, api)
    if saved is not None:
        principal = TokenTable(entries).verify(saved)
        if principal is not None and principal.admin:
            return None
    names = {e.name for e in entries}
    name = "admin" if "admin" not in names else f"admin-{secrets.token_hex(3)}"
    token = generate_token()
    entry = TokenEntry(name=name, namespace="default", sha256=hash_token(token), admin=True)
    save_token_file(token_file, [*entries, entry])
    write_credentials(credentials, api, token)
    return name


def _wait_healthy(api: str, deadline: float, progress: Progress, task: object) -> dict[str, object]:
    delay = 0.2
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{api}/v1/health", headers=_headers(api), timeout=5)
            if resp.status_code == 200 and resp.json().get("status") == "ok":
                return dict(resp.json())
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        progress.update(task, description=f"waiting for the platform ({last})")  # type: ignore[arg-type]
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)
    raise SystemExit(f"rock: the platform did not become healthy in time (last: {last})")


def up(
    config: Path,
    api: str,
    dashboard: str,
    timeout: float,
    console: Console,
    ports: RayPorts | None = None,
) -> Endpoints:
    """Start a local Ray head unless one answers, deploy ``config``, wait until healthy.

    A head started here listens on loopback only and needs Ray's token (see the module doc).
    """
    started: tuple[int, str] | None = None
    ports = ports or RayPorts()
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("checking for a running Ray head", total=None)
        ray_auth = _head_auth(dashboard)
        if ray_auth is None:
            progress.update(task, description="starting a local Ray head (loopback, token auth)")
            started = _start_head(dashboard, ports, timeout)
            ray_auth = True
        token_file = _token_file(config)
        made: str | None = None
        if token_file is not None:
            made = ensure_admin_token(token_file, api)
            if made is not None:
                progress.console.print(
                    f"auth: admin token {made!r} saved in {credentials_path()} "
                    f"(its hash in {token_file})"
                )
        progress.update(task, description=f"serve deploy {config}")
        res = serve_deploy(config, dashboard, timeout=timeout, ray_auth=ray_auth)
        if res.returncode != 0:
            raise SystemExit(f"rock: serve deploy failed:\n{res.stderr[-2000:]}")
        health = _wait_healthy(api, time.monotonic() + timeout, progress, task)
    state: dict[str, object] = {"api": api, "ray_auth": ray_auth}
    if started is not None:
        state.update(started_head=True, session=started[0], marker=started[1])
        state.update(temp_dir=RAY_TEMP_DIR, ray_client=f"127.0.0.1:{ports.client}")
    elif STATE_FILE.exists():  # a second `rock up` on the head an earlier one started
        previous = json.loads(STATE_FILE.read_text())
        if previous.get("started_head"):
            state = {**previous, **state}
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps(state))
    workers = health.get("workers") or []
    console.print(f"platform up: {len(workers)} worker(s)")  # type: ignore[arg-type]
    console.print(f"console: {api.rstrip('/')}/ui/")
    if token_file is not None:
        token = read_credentials(credentials_path(), api)
        if made is not None and token is not None:  # a new token: shown once, for the login
            console.print(f"log in with the admin token: {token}", markup=False)
        else:
            console.print(f"log in with the admin token stored in {credentials_path()}")
    from_env = bool(os.environ.get("RAY_AUTH_TOKEN", "").strip())
    client = state.get("ray_client")
    return Endpoints(
        api=api,
        dashboard=dashboard,
        ray_token_file=None if from_env or not ray_auth else ray_token_file(),
        ray_client=f"ray://{client}" if client else None,
        ray_auth=bool(ray_auth),
    )


def _head_pids(session: int | None, marker: str | None, temp_dir: str | None) -> list[int]:
    """Live processes of a head ``rock up`` started: in its session, carrying its marker in
    their environment, or naming its temp dir in their command line (zombies left out).
    """
    pids = []
    tag = f"{MARKER}={marker}".encode() if marker else None
    needle = temp_dir.encode() if temp_dir else None
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] in ("Z", "X"):
                continue
            mine = session is not None and int(fields[3]) == session
            if not mine and needle is not None:
                mine = needle in Path(f"/proc/{entry}/cmdline").read_bytes()
            if not mine and tag is not None:
                mine = tag in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if mine:
            pids.append(int(entry))
    return pids


def _delete_all_sandboxes(api: str) -> int:
    """Delete every sandbox through the API, so mounts and cgroups go with them."""
    try:
        with httpx.Client(base_url=api, headers=_headers(api), timeout=60) as client:
            items = client.get("/v1/sandboxes").json().get("items", [])
            for item in items:
                client.delete(f"/v1/sandboxes/{item['id']}")
            return len(items)
    except (httpx.HTTPError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _stop_pids(pids: list[int], grace: float = 10.0) -> list[int]:
    """Stop ``pids`` as `ray stop` does: the raylet first, the GCS last, the rest between.

    Each group gets SIGTERM, then SIGKILL for what is still there after ``grace`` seconds.
    All at once, the GCS and the agents outlived SIGTERM (10 s of every `rock down`).
    """
    first = [p for p in pids if _comm(p) == "raylet"]
    last = [p for p in pids if _comm(p) == "gcs_server"]
    rest = [p for p in pids if p not in first and p not in last]
    for group in (first, rest, last):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in group:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_alive(p) for p in group):
                time.sleep(0.1)
    return pids


def down(dashboard: str, console: Console) -> int:
    """Shut Serve down; stop the Ray head only if ``rock up`` started it (never others).

    Returns an exit code: 1 when a process of that head could not be stopped.
    """
    state = json.loads(STATE_FILE.read_text()) if STATE_FILE.exists() else {}
    api = str(state.get("api", "http://127.0.0.1:8000"))
    removed = _delete_all_sandboxes(api)
    if removed:
        console.print(f"removed {removed} sandbox(es)")
    ray_auth = _head_auth(dashboard)
    if ray_auth is not None:
        res = _run(
            [_bin("serve"), "shutdown", "-y", "-a", dashboard], timeout=120, ray_auth=ray_auth
        )
        console.print("serve: shut down" if res.returncode == 0 else res.stderr[-500:])
    if state.get("started_head"):
        session = state.get("session")
        marker = state.get("marker")
        temp_dir = str(state.get("temp_dir", RAY_TEMP_DIR))
        which = (int(session) if session else None, str(marker) if marker else None, temp_dir)
        pids = _stop_pids(_head_pids(*which))
        left = _head_pids(*which)
        if left:
            console.print(f"[red]ray: {len(left)} process(es) of the head survive[/red]: {left}")
            return 1
        console.print(f"ray: stopped the head rock up started ({len(pids)} processes)")
    STATE_FILE.unlink(missing_ok=True)
    return 0


def status(api: str, console: Console) -> int:
    """Print the Workers and sandboxes; returns an exit code."""
    try:
        headers = _headers(api)
        health = httpx.get(f"{api}/v1/health", headers=headers, timeout=5).json()
        listing = httpx.get(f"{api}/v1/sandboxes", headers=headers, timeout=5)
        if listing.status_code in (401, 403):
            error = listing.json().get("error", {})
            console.print(f"[red]{error.get('code')}[/red]: {error.get('message')} (ROCK_TOKEN?)")
            return 1
        sandboxes = listing.json().get("items", [])
    except (httpx.HTTPError, ValueError) as exc:
        console.print(f"[red]platform not reachable at {api}[/red]: {exc}")
        return 1
    workers = Table("worker", "node", "alive", "sandboxes", "capacity", "runtime")
    for w in health.get("workers", []):
        workers.add_row(
            w["name"],
            w["node_id"][:12],
            str(w["alive"]),
            str(w["sandboxes"]),
            str(w["capacity"]),
            w["runtime"],
        )
    console.print(workers)
    boxes = Table("sandbox", "state", "namespace", "owner", "worker", "age s")
    now = time.time()
    for sb in sandboxes:
        boxes.add_row(
            sb["id"],
            sb["state"],
            sb.get("namespace", "default"),
            sb.get("owner", ""),
            sb["worker"],
            f"{now - sb['created_at']:.0f}",
        )
    console.print(boxes)
    return 0
