"""`serve deploy serve_config.yaml` on a cluster started with `ray start --head` (see _head.py),
then a redeploy of an edited copy: Admin args, runtime config and autoscaling change; the
sandboxes of the first deploy survive it."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest
import yaml

from tests.e2e._head import BIN, deploy, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.timeout(600)  # the head's start and two deploys
def test_serve_deploy_then_an_edited_yaml_redeployed_changes_behaviour(ray_head, tmp_path):
    # One test, one head, two deploys: serve_config.yaml as shipped (it serves sandboxes), then
    # the edited YAML over it (was two tests, the first deploy made twice: ~30 s of CI).
    first = deploy(ray_head, tmp_path, "rock-e2e-redeploy", state="first")
    with httpx.Client(base_url=ray_head.url, timeout=60) as api:
        resp = api.post("/v1/sandboxes", json={"ttl_seconds": 300})
        assert resp.status_code == 201, resp.text
        old = resp.json()["id"]
        out = api.post(f"/v1/sandboxes/{old}/exec", json={"command": "echo deployed"}).json()
        assert out["stdout"] == "deployed\n"
        assert [p.name for p in first.iterdir()] == [old]
        api.put(f"/v1/sandboxes/{old}/files", params={"path": "kept.txt"}, content=b"kept")

        def edit(app):
            app["args"]["max_sandboxes_per_node"] = 1
            app["deployments"][0]["autoscaling_config"]["min_replicas"] = 2

        second = deploy(ray_head, tmp_path, "rock-e2e-redeploy", edit=edit, state="second")
        wait_for(
            lambda: api.get("/v1/health").json()["workers"][0]["capacity"] == 1,
            time.monotonic() + 60,
            "the new limits",
        )
        # The sandbox outlived the Admin redeploy: it belongs to its Worker.
        out = api.post(f"/v1/sandboxes/{old}/exec", json={"command": "cat kept.txt"}).json()
        assert out.get("stdout") == "kept", out
        # New limit: one sandbox per node, so a second create is refused with 429.
        refused = api.post("/v1/sandboxes", json={})
        assert refused.status_code == 429 and "Retry-After" in refused.headers
        # New runtime config: new sandboxes live under the new state dir.
        assert api.delete(f"/v1/sandboxes/{old}").status_code == 204
        resp = api.post("/v1/sandboxes", json={"ttl_seconds": 300})
        assert resp.status_code == 201, resp.text
        new = resp.json()["id"]
        assert [p.name for p in second.iterdir()] == [new]
        assert list(first.iterdir()) == []

        # New autoscaling floor: two Admin replicas.
        def running_admins() -> bool:
            status = subprocess.run(
                [str(BIN / "serve"), "status", "--address", ray_head.dashboard],
                env=ray_head.env,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
            admin = yaml.safe_load(status)["applications"]["rock"]["deployments"]["Admin"]
            return bool(admin["replica_states"].get("RUNNING", 0) >= 2)

        wait_for(running_admins, time.monotonic() + 60, "two Admin replicas")
        assert api.delete(f"/v1/sandboxes/{new}").status_code == 204
