"""Networked bwrap sandboxes through the platform (REST), next to the real Ray and Serve.

A fourth app in the session's Ray, on bwrap with ``allow_network`` and a bridge of its own.
From inside a ``bridge`` sandbox: the egress target in a test namespace answers; the Admin's
port on 127.0.0.1 (the sandbox's own loopback there), Ray's GCS port on the host's bridge
address and on another host address do not. Only this machine's namespaces are ever targets.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid

import pytest

from rock_serve.protocol import ExecResult
from rock_serve.runtime._netns import LEASE_ROOT
from tests.e2e.conftest import Platform, _wait_healthy, delete_app
from tests.security._net import OUT_PORT, PROBE, host_servers, octet, outside

pytestmark = [pytest.mark.ray, pytest.mark.bwrap, pytest.mark.slow]
__all__ = ["host_servers", "octet", "outside"]  # fixtures used here


@pytest.fixture(scope="module")
def net_platform(platform: Platform, tmp_path_factory, octet):
    from tests.contract.conftest import TEST_CGROUP_PARENT, bwrap_unavailable

    reason = bwrap_unavailable()
    if reason is not None:
        pytest.skip(reason)
    from ray import serve

    from rock_serve.deployments.app import build_app

    state_dir = tmp_path_factory.mktemp("rock-net-state")
    bridge = f"rkte{uuid.uuid4().hex[:6]}"
    args = {
        "runtime": {
            "type": "bwrap",
            "state_dir": str(state_dir),
            "cgroup_parent": TEST_CGROUP_PARENT,
            "allow_network": True,
            "bridge": {"name": bridge, "subnet": f"10.216.{octet}.0/24"},
        },
        "namespace": "rock-e2e-net",
        "reap_interval_seconds": 0.2,
    }
    serve.run(build_app(args), name="net", route_prefix="/net")
    url = f"{platform.url}/net"
    _wait_healthy(url, time.monotonic() + 60)
    try:
        yield Platform(url=url, state_dir=state_dir, runtime="bwrap"), bridge
    finally:
        with platform.client() as api:
            for item in api.get("/net/v1/sandboxes").json().get("items", []):
                api.delete(f"/net/v1/sandboxes/{item['id']}")
        delete_app("net", "rock-e2e-net")
        subprocess.run(["nft", "delete", "table", "inet", f"rock-{bridge}"], check=False)
        subprocess.run(["ip", "link", "del", bridge], check=False)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(LEASE_ROOT, bridge))  # empty: every sandbox was removed


def test_bridge_sandbox_over_rest_reaches_its_target_and_no_host_service(
    net_platform, outside, octet
):
    import ray

    plat, _ = net_platform
    gcs_port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
    admin_port = int(plat.url.split(":")[2].split("/")[0])
    allowed = f"{outside.allowed}:{OUT_PORT}"
    with plat.client() as api:
        resp = api.post("/v1/sandboxes", json={"network": "bridge", "egress": [allowed]})
        assert resp.status_code == 201, resp.text
        record = resp.json()
        assert record["network"] == "bridge" and record["egress"] == [allowed]
        gateway = f"10.216.{octet}.1"
        targets = [
            allowed,
            f"{outside.denied}:{OUT_PORT}",
            f"127.0.0.1:{admin_port}",  # the Admin (Serve's proxy) on the host's loopback
            f"{gateway}:{gcs_port}",  # Ray's GCS, through the host's bridge address
            f"{outside.host_ip}:{gcs_port}",  # ... and another host address
        ]
        res = api.post(
            f"/v1/sandboxes/{record['id']}/exec",
            json={"command": ["python3", "-c", PROBE, *targets], "timeout": 60},
        )
        result = ExecResult.model_validate(res.json())
        verdicts = dict(line.split(" ", 1) for line in result.stdout.splitlines())
        assert verdicts[allowed] == f"OK outside-{allowed}", verdicts
        for target in targets[1:]:
            assert not verdicts[target].startswith("OK"), (target, verdicts)
        assert api.delete(f"/v1/sandboxes/{record['id']}").status_code == 204


def test_network_refusals_over_rest(net_platform):
    plat, _ = net_platform
    with plat.client() as api:
        for body, status, code in (
            ({"network": "host"}, 400, "invalid_config"),
            ({"egress": ["10.0.0.0/8"]}, 400, "invalid_request"),
            ({"network": "bridge", "egress": ["10.0.0.0/8:x"]}, 400, "invalid_request"),
        ):
            resp = api.post("/v1/sandboxes", json=body)
            assert resp.status_code == status, resp.text
            assert resp.json()["error"]["code"] == code, resp.text
        assert api.get("/v1/sandboxes").json()["items"] == []


def test_cli_creates_a_bridge_sandbox_with_an_allow_list(net_platform, outside):
    plat, _ = net_platform
    allowed = f"{outside.allowed}:{OUT_PORT}"
    env = {**os.environ, "ROCK_BASE_URL": plat.url}
    argv = [sys.executable, "-m", "rock_serve.sdk.cli", "sandbox", "create"]
    argv += ["--network", "bridge", "--egress", allowed, "--ttl", "120"]
    created = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True)
    sandbox_id = created.stdout.strip()
    with plat.client() as api:
        record = api.get(f"/v1/sandboxes/{sandbox_id}").json()
        assert (record["network"], record["egress"]) == ("bridge", [allowed])
        assert api.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
    refused = subprocess.run(
        [*argv[:5], "--network", "host"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1 and "invalid_config" in refused.stderr


def test_bridge_sandbox_port_is_relayed(net_platform):
    """A server on the bridged sandbox's loopback is reached through the port relay (issue
    15.2): the rocklet connects inside the sandbox's own network namespace."""
    from tests._wait import wait_until

    plat, _ = net_platform
    with plat.client() as api:
        resp = api.post("/v1/sandboxes", json={"network": "bridge", "ttl_seconds": 120})
        assert resp.status_code == 201, resp.text
        sandbox_id = resp.json()["id"]
        api.post(
            f"/v1/sandboxes/{sandbox_id}/sessions",
            json={"session": "srv"},
        ).raise_for_status()
        started = api.post(
            f"/v1/sandboxes/{sandbox_id}/sessions/srv/run",
            json={
                "command": "mkdir -p site && echo relayed >site/x.txt && "
                "python3 -m http.server 8765 --bind 127.0.0.1 -d site >/dev/null 2>&1 &"
            },
        )
        assert started.status_code == 200, started.text

        def fetched():
            got = api.get(f"/v1/sandboxes/{sandbox_id}/ports/8765/x.txt")
            assert got.status_code in (200, 502), got.text  # 502 port_closed: not yet up
            return got if got.status_code == 200 else None

        assert wait_until(fetched, what="the bridged sandbox's server").text == "relayed\n"
        assert api.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
