"""The platform on the docker runtime, end to end over HTTP: configs/docker.yaml's args, real
Ray Serve, real dockerd and containers of the offline test image.

The session's ``platform`` fixture only provides Ray and Serve; this module deploys its own app
(``rock-docker`` under ``/docker``, Ray namespace ``rock-e2e-docker``, a runtime scope of its
own) and deletes it, its sandboxes and (as a safety net, after checking there are none) any
container of its scope.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from rock_serve.config import DOCKER_TEST_IMAGE
from rock_serve.protocol import ExecResult, Health, SandboxRecord, SessionRunResult
from tests.contract.conftest import require_docker

from .conftest import Platform, _wait_healthy, delete_app

pytestmark = [pytest.mark.ray, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "rock-e2e-docker"


def docker_args(scope: str, agent_dir: str) -> dict:
    """configs/docker.yaml's ``args:``, with this test's namespace, scope and agent dir."""
    config = yaml.safe_load((ROOT / "configs" / "docker.yaml").read_text())
    (app,) = config["applications"]
    args = dict(app["args"])
    # No bearer tokens or audit file in this test (issue 6's tests cover them).
    args.pop("auth", None)
    args.pop("audit", None)
    runtime = dict(args["runtime"])
    assert runtime["type"] == "docker" and runtime["image"] == DOCKER_TEST_IMAGE
    runtime.update(scope=scope, agent_dir=agent_dir, stop_timeout_seconds=1)
    args.update(runtime=runtime, namespace=NAMESPACE, reap_interval_seconds=0.5)
    return args


def containers(scope: str) -> list[dict]:
    import docker

    client = docker.APIClient(version="auto")
    try:
        return list(client.containers(all=True, filters={"label": f"rock-serve.scope={scope}"}))
    finally:
        client.close()


@pytest.fixture(scope="module")
def scope() -> str:
    return f"e2e-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def docker_platform(platform: Platform, scope: str, tmp_path_factory) -> Iterator[Platform]:
    require_docker()
    from ray import serve

    from rock_serve.deployments.app import build_app

    agent_dir = tmp_path_factory.mktemp("rock-docker-agent")
    serve.run(
        build_app(docker_args(scope, str(agent_dir))), name="rock-docker", route_prefix="/docker"
    )
    url = f"{platform.url}/docker"
    try:
        _wait_healthy(url, time.monotonic() + 60)
        yield Platform(url=url, state_dir=agent_dir, runtime="docker")
    finally:
        with httpx.Client(base_url=url, timeout=60) as api:
            for item in api.get("/v1/sandboxes").json().get("items", []):
                api.delete(f"/v1/sandboxes/{item['id']}")
        left = containers(scope)
        delete_app("rock-docker", NAMESPACE)
        if left:  # the safety net; a test below has failed already
            import docker

            client = docker.APIClient(version="auto")
            for c in left:
                client.remove_container(c["Id"], force=True, v=True)
            client.close()


@pytest.fixture
def api(docker_platform: Platform) -> Iterator[httpx.Client]:
    with docker_platform.client() as client:
        yield client


def test_health_names_the_docker_runtime(api):
    health = Health.model_validate(api.get("/v1/health").json())
    assert health.status == "ok"
    assert [(w.alive, w.runtime) for w in health.workers] == [(True, "docker")]


def test_sandbox_in_a_container_over_http(api, scope):
    started = time.perf_counter()
    resp = api.post(
        "/v1/sandboxes",
        json={
            "owner": "e2e",
            "labels": {"suite": "docker-e2e"},
            "env": {"GREETING": "hello"},
            "resources": {"cpus": 1, "memory_mb": 256, "pids": 128},
        },
    )
    assert resp.status_code == 201, resp.text
    sb = SandboxRecord.model_validate(resp.json())
    create_ms = (time.perf_counter() - started) * 1000
    assert sb.state == "running"
    base = f"/v1/sandboxes/{sb.id}"
    (c,) = containers(scope)
    assert c["Labels"]["rock.sandbox-id"] == sb.id and c["State"] == "running"
    assert c["Image"] == DOCKER_TEST_IMAGE

    res = ExecResult.model_validate(
        api.post(f"{base}/exec", json={"command": "echo $GREETING; cat /etc/debian_version"}).json()
    )
    assert res.exit_code == 0 and res.stdout.startswith("hello\n12.")
    net = ExecResult.model_validate(
        api.post(f"{base}/exec", json={"command": "ls /sys/class/net"}).json()
    )
    assert net.stdout.split() == ["lo"]  # network none by default

    assert api.post(f"{base}/sessions", json={"session": "s"}).status_code == 200
    run = api.post(f"{base}/sessions/s/run", json={"command": "cd /tmp && X=42"})
    assert SessionRunResult.model_validate(run.json()).exit_code == 0
    run = SessionRunResult.model_validate(
        api.post(f"{base}/sessions/s/run", json={"command": "echo $X $PWD"}).json()
    )
    assert (run.output, run.exit_code) == ("42 /tmp\n", 0)

    put = api.put(f"{base}/files", params={"path": "/opt/f.txt"}, content=b"data")
    assert put.status_code == 200, put.text
    assert api.get(f"{base}/files", params={"path": "/opt/f.txt"}).content == b"data"
    stats = api.get(f"{base}/stats").json()
    assert (stats["memory_limit_bytes"], stats["pids_limit"]) == (256 << 20, 128)

    assert api.delete(base).status_code == 204
    assert api.get(base).status_code == 404
    assert containers(scope) == [], "the container was left behind"
    print(f"docker create over HTTP: {create_ms:.0f} ms")


def test_typed_errors_over_http(api, scope):
    resp = api.post("/v1/sandboxes", json={"image": "rock-serve/no-such-image:1"})
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["code"] == "image_not_found"
    resp = api.post("/v1/sandboxes", json={"network": "bridge"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_config"
    assert containers(scope) == []
