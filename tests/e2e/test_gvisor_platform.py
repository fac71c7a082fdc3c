"""The platform on the gvisor runtime, end to end over HTTP: configs/gvisor.yaml's args, real
Ray Serve, real dockerd with runsc, containers of the offline test image.

Like test_docker_platform.py: this module deploys its own app (``rock-gvisor`` under
``/gvisor``, a runtime scope of its own) and deletes it, its sandboxes and (as a safety net)
any container of its scope.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from rock_serve.config import DOCKER_TEST_IMAGE
from rock_serve.protocol import ExecResult, Health, SandboxRecord
from tests.contract.conftest import require_gvisor

from .conftest import Platform, _wait_healthy, delete_app
from .test_docker_platform import containers

pytestmark = [pytest.mark.ray, pytest.mark.docker, pytest.mark.gvisor]

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "rock-e2e-gvisor"


def gvisor_args(scope: str, agent_dir: str) -> dict:
    """configs/gvisor.yaml's ``args:``, with this test's namespace, scope and agent dir."""
    config = yaml.safe_load((ROOT / "configs" / "gvisor.yaml").read_text())
    (app,) = config["applications"]
    args = dict(app["args"])
    args.pop("auth", None)
    args.pop("audit", None)
    runtime = dict(args["runtime"])
    assert runtime["type"] == "gvisor" and runtime["image"] == DOCKER_TEST_IMAGE
    runtime.update(scope=scope, agent_dir=agent_dir, stop_timeout_seconds=1)
    args.update(runtime=runtime, namespace=NAMESPACE, reap_interval_seconds=0.5)
    return args


@pytest.fixture(scope="module")
def scope() -> str:
    return f"e2e-gv-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def gvisor_platform(platform: Platform, scope: str, tmp_path_factory) -> Iterator[Platform]:
    require_gvisor()
    from ray import serve

    from rock_serve.deployments.app import build_app

    agent_dir = tmp_path_factory.mktemp("rock-gvisor-agent")
    serve.run(
        build_app(gvisor_args(scope, str(agent_dir))), name="rock-gvisor", route_prefix="/gvisor"
    )
    url = f"{platform.url}/gvisor"
    try:
        _wait_healthy(url, time.monotonic() + 60)
        yield Platform(url=url, state_dir=agent_dir, runtime="gvisor")
    finally:
        with httpx.Client(base_url=url, timeout=60) as api:
            for item in api.get("/v1/sandboxes").json().get("items", []):
                api.delete(f"/v1/sandboxes/{item['id']}")
        left = containers(scope)
        delete_app("rock-gvisor", NAMESPACE)
        if left:  # the safety net; a test below has failed already
            import docker

            client = docker.APIClient(version="auto")
            for c in left:
                client.remove_container(c["Id"], force=True, v=True)
            client.close()


@pytest.fixture
def api(gvisor_platform: Platform) -> Iterator[httpx.Client]:
    with gvisor_platform.client() as client:
        yield client


def test_health_names_the_gvisor_runtime(api):
    health = Health.model_validate(api.get("/v1/health").json())
    assert [(w.alive, w.runtime) for w in health.workers] == [(True, "gvisor")]


def test_sandbox_on_gvisor_over_http(api, scope):
    resp = api.post(
        "/v1/sandboxes",
        json={
            "owner": "e2e",
            "env": {"GREETING": "hello"},
            "resources": {"memory_mb": 256, "pids": 128},
        },
    )
    assert resp.status_code == 201, resp.text
    sb = SandboxRecord.model_validate(resp.json())
    assert sb.state == "running"
    base = f"/v1/sandboxes/{sb.id}"
    (c,) = containers(scope)
    assert c["Labels"]["rock.sandbox-id"] == sb.id and c["State"] == "running"

    probe = (
        "import os; print(os.environ['GREETING'], os.uname().release, os.listdir('/sys/class/net'))"
    )
    res = ExecResult.model_validate(
        api.post(f"{base}/exec", json={"command": ["python3", "-c", probe]}).json()
    )
    greeting, release, nets = res.stdout.split(" ", 2)
    assert (res.exit_code, greeting) == (0, "hello")
    assert release != os.uname().release  # the Sentry's kernel, not the host's
    assert nets.strip() == "['lo']"  # network none by default
    put = api.put(f"{base}/files", params={"path": "/opt/f.txt"}, content=b"data")
    assert put.status_code == 200, put.text
    assert api.get(f"{base}/files", params={"path": "/opt/f.txt"}).content == b"data"
    stats = api.get(f"{base}/stats").json()
    assert (stats["memory_limit_bytes"], stats["pids_limit"]) == (256 << 20, 128)

    assert api.delete(base).status_code == 204
    assert api.get(base).status_code == 404
    assert containers(scope) == [], "the container was left behind"
