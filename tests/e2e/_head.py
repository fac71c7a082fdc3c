"""A separate Ray head started with `ray start --head`, and `serve deploy` of our YAML on it.

The head runs on free ports with its own temp dir, as `ray start --head --block` in its own
process group: teardown ends that group only (never `ray stop`, which would stop every Ray on
the machine). The YAML deployed is serve_config.yaml with the runtime switched to `local`, a
temp state dir, a free HTTP port and its own namespace; nothing else changes.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from rock_serve.sdk.cli._platform import serve_deploy

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class Head:
    dashboard: str
    http_port: int
    env: dict[str, str]
    temp: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(check: Callable[[], Any], deadline: float, what: str) -> Any:
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, ValueError) as exc:
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}: {last}")


@contextlib.contextmanager
def ray_head() -> Iterator[Head]:
    temp_dir = tempfile.mkdtemp(prefix="rsd-", dir="/tmp")
    gcs, dash, client, nm, om, agent, agent_grpc, metrics, rt_env, http = free_ports(10)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    argv = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")  # noqa: SIM115
    proc = subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield Head(dashboard=f"http://127.0.0.1:{dash}", http_port=http, env=env, temp=temp_dir)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)  # `ray start --block` may ignore SIGTERM; its group then gets SIGKILL
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def deploy(
    head: Head,
    tmp_path: Path,
    namespace: str,
    edit: Callable[[dict[str, Any]], None] | None = None,
    state: str = "state",
    also: dict[str, Callable[[dict[str, Any]], None]] | None = None,
) -> Path:
    """`serve deploy` serve_config.yaml (local runtime) and wait until healthy; the state dir.

    ``edit`` may change the application's entry (``args``, ``deployments``) before deploying,
    as a user editing the YAML would. ``also`` deploys more platforms beside it on the same
    head (one Ray head costs more than one more app): route prefix -> an edit of a copy of
    the edited entry (the copy is named after the prefix and gets its own namespace
    ``<namespace>-<prefix>``; the edit sets at least its runtime).
    """
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": head.http_port}
    config.pop("grpc_options", None)
    app = config["applications"][0]
    state_dir = tmp_path / state
    app["args"]["runtime"] = {"type": "local", "state_dir": str(state_dir)}
    app["args"]["namespace"] = namespace
    app["args"]["auth"] = {"mode": "disabled"}
    app["args"]["audit"] = {"path": str(tmp_path / f"audit-{state}.jsonl")}
    if edit is not None:
        edit(app)
    for prefix, more in (also or {}).items():
        other = copy.deepcopy(app)
        name = prefix.strip("/")
        other["name"], other["route_prefix"] = f"{app['name']}-{name}", prefix
        other["args"]["namespace"] = f"{namespace}-{name}"
        more(other)
        config["applications"].append(other)
    path = tmp_path / f"serve_config-{state}.yaml"
    path.write_text(yaml.safe_dump(config))
    wait_for(
        lambda: httpx.get(f"{head.dashboard}/api/version", timeout=5).status_code == 200,
        time.monotonic() + 180,  # about a minute on a 2-core machine at load 30
        "the dashboard",
    )
    result = serve_deploy(path, head.dashboard, timeout=120, env=head.env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]

    def deployed() -> bool:
        health = httpx.get(f"{head.url}/v1/health", timeout=10).json()
        return bool(health.get("status") == "ok" and health.get("namespace") == namespace)

    wait_for(deployed, time.monotonic() + 180, "the deployed app")
    for prefix in also or {}:
        url = f"{head.url}{prefix}/v1/health"
        wait_for(
            lambda url=url: httpx.get(url, timeout=10).json().get("status") == "ok",
            time.monotonic() + 180,
            f"the app at {prefix}",
        )
    return state_dir
