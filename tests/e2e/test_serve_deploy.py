"""`serve deploy serve_config.yaml` on a cluster started with `ray start --head`.

The head runs on free ports with its own temp dir, as `ray start --head --block` in its own
process group: teardown ends that group only (never `ray stop`, which would stop every Ray on
the machine). The YAML deployed is serve_config.yaml with the runtime switched to `local`, a
temp state dir and a free HTTP port; nothing else changes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def head():
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray CLI is not installed")
    temp_dir = tempfile.mkdtemp(prefix="rsd-", dir="/tmp")
    gcs, dash, client, nm, om, agent, agent_grpc, metrics, rt_env, http = _free_ports(10)
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
        yield {
            "dashboard": f"http://127.0.0.1:{dash}",
            "http_port": http,
            "env": env,
            "temp": temp_dir,
        }
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


def _wait(check, deadline: float, what: str):
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


def test_serve_deploy_serve_config_yaml(head, tmp_path):
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": head["http_port"]}
    config.pop("grpc_options", None)
    app = config["applications"][0]
    state_dir = tmp_path / "state"
    app["args"]["runtime"] = {"type": "local", "state_dir": str(state_dir)}
    app["args"]["namespace"] = "rock-e2e-deploy"
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))

    dashboard = head["dashboard"]
    _wait(
        lambda: httpx.get(f"{dashboard}/api/version", timeout=5).status_code == 200,
        time.monotonic() + 60,
        "the dashboard",
    )
    deploy = subprocess.run(
        [str(BIN / "serve"), "deploy", str(path), "--address", dashboard],
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert deploy.returncode == 0, deploy.stderr[-2000:]

    url = f"http://127.0.0.1:{head['http_port']}"
    _wait(
        lambda: httpx.get(f"{url}/v1/health", timeout=10).json().get("status") == "ok",
        time.monotonic() + 90,
        "the deployed app",
    )
    with httpx.Client(base_url=url, timeout=60) as api:
        resp = api.post("/v1/sandboxes", json={"ttl_seconds": 120})
        assert resp.status_code == 201, resp.text
        sid = resp.json()["id"]
        out = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "echo deployed"}).json()
        assert out["stdout"] == "deployed\n"
        assert api.delete(f"/v1/sandboxes/{sid}").status_code == 204
    assert list(state_dir.iterdir()) == []
