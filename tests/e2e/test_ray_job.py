"""A script submitted with `ray job submit` drives sandboxes through the SDK's Ray transport.

The head runs on free ports with its own temp dir (the pattern of ``test_serve_deploy.py``:
`ray start --head --block` in its own process group, ended by group, never `ray stop`). The
platform is deployed with `serve deploy` (serve_config.yaml on the local runtime), then
``jobs/ray_transport_job.py`` is submitted without a working dir (the package is installed in
the venv) and its ``RESULT`` line is checked. It prints the in-session echo latency it measured.
"""

from __future__ import annotations

import contextlib
import json
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
JOB = Path(__file__).resolve().parent / "jobs" / "ray_transport_job.py"
NAMESPACE = "rock-e2e-job"


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
    temp_dir = tempfile.mkdtemp(prefix="rsj-", dir="/tmp")
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


def test_ray_job_uses_the_ray_transport(head, tmp_path):
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": head["http_port"]}
    config.pop("grpc_options", None)
    app = config["applications"][0]
    state_dir = tmp_path / "state"
    app["args"]["runtime"] = {"type": "local", "state_dir": str(state_dir)}
    app["args"]["namespace"] = NAMESPACE
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

    submission_id = f"rock-ray-transport-{os.getpid()}"
    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            dashboard,
            "--submission-id",
            submission_id,
            "--",
            sys.executable,
            str(JOB),
            NAMESPACE,
        ],
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(dashboard).get_job_status(submission_id) == JobStatus.SUCCEEDED

    lines = [line for line in submit.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, submit.stdout[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    print(
        f"\nray job, in-session echo over the Ray transport: p50 {result['echo_p50_ms']:.2f} ms"
        f" p99 {result['echo_p99_ms']:.2f} ms"
    )
    assert result["echo"] == "via-ray\n"
    assert result["session_env"] == "ray\n"
    assert result["read"] == "from the job\n"
    assert result["big_ok"] is True
    assert result["deleted"] is True
    assert result["echo_p50_ms"] <= 6.0  # target 3 ms; room for a loaded CI machine
    # Nothing is left behind: the job deleted its sandbox.
    assert httpx.get(f"{url}/v1/sandboxes", timeout=10).json()["items"] == []
    assert list(state_dir.iterdir()) == []
