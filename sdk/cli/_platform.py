"""``rock up|down|status``: run the platform on a local Ray head through Ray's own CLIs.

Nothing here imports ``ray``: the CLI talks to Ray through ``ray``/``serve`` subprocesses and to
the platform through its HTTP API, so it works from any Python that has rock-serve installed.

Auth: when the deployed config sets ``auth.token_file``, ``rock up`` makes sure the SDK's
credentials file (``~/.rock/credentials`` or ``ROCK_CREDENTIALS``) holds an admin token for
the API that the token file accepts, creating both (mode 0600) as needed, before deploying.
``status`` and ``down`` send that token (or ``ROCK_TOKEN``).
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


@dataclass
class Endpoints:
    """Where the platform answers."""

    api: str
    dashboard: str


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"rock: '{name}' not found; install rock-serve[server]")
    return found


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def _run(argv: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def _head_running(dashboard: str) -> bool:
    try:
        return httpx.get(f"{dashboard}/api/version", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


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


def up(config: Path, api: str, dashboard: str, timeout: float, console: Console) -> Endpoints:
    """Start a local Ray head unless one answers, deploy ``config``, wait until healthy."""
    started_head = False
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("checking for a running Ray head", total=None)
        if not _head_running(dashboard):
            progress.update(task, description="starting a local Ray head")
            res = _run(
                [
                    _bin("ray"),
                    "start",
                    "--head",
                    "--dashboard-host",
                    "127.0.0.1",
                    f"--temp-dir={RAY_TEMP_DIR}",
                    "--disable-usage-stats",
                ],
                timeout=timeout,
            )
            if res.returncode != 0:
                raise SystemExit(f"rock: ray start failed:\n{res.stderr[-2000:]}")
            started_head = True
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
        res = _run([_bin("serve"), "deploy", str(config), "-a", dashboard], timeout=timeout)
        if res.returncode != 0:
            raise SystemExit(f"rock: serve deploy failed:\n{res.stderr[-2000:]}")
        health = _wait_healthy(api, time.monotonic() + timeout, progress, task)
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(
        json.dumps({"started_head": started_head, "temp_dir": RAY_TEMP_DIR, "api": api})
    )
    workers = health.get("workers") or []
    console.print(f"platform up: {len(workers)} worker(s)")  # type: ignore[arg-type]
    console.print(f"console: {api.rstrip('/')}/ui/")
    if token_file is not None:
        token = read_credentials(credentials_path(), api)
        if made is not None and token is not None:  # a new token: shown once, for the login
            console.print(f"log in with the admin token: {token}", markup=False)
        else:
            console.print(f"log in with the admin token stored in {credentials_path()}")
    return Endpoints(api=api, dashboard=dashboard)


def _our_ray_pids(temp_dir: str) -> list[int]:
    pids = []
    needle = temp_dir.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
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


def _stop_pids(pids: list[int], grace: float = 10.0) -> list[int]:
    """SIGTERM ``pids``, then SIGKILL what is still there after ``grace`` seconds (as ray stop)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.1)
    return pids


def down(dashboard: str, console: Console) -> None:
    """Shut Serve down; stop the Ray head only if ``rock up`` started it (never others)."""
    state = json.loads(STATE_FILE.read_text()) if STATE_FILE.exists() else {}
    api = str(state.get("api", "http://127.0.0.1:8000"))
    removed = _delete_all_sandboxes(api)
    if removed:
        console.print(f"removed {removed} sandbox(es)")
    if _head_running(dashboard):
        res = _run([_bin("serve"), "shutdown", "-y", "-a", dashboard], timeout=120)
        console.print("serve: shut down" if res.returncode == 0 else res.stderr[-500:])
    if state.get("started_head"):
        pids = _stop_pids(_our_ray_pids(str(state.get("temp_dir", RAY_TEMP_DIR))))
        console.print(f"ray: stopped the head rock up started ({len(pids)} processes)")
    STATE_FILE.unlink(missing_ok=True)


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
