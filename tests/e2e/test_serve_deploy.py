"""`serve deploy serve_config.yaml` on a cluster started with `ray start --head` (see _head.py)."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e._head import deploy

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_serve_deploy_serve_config_yaml(ray_head, tmp_path):
    state_dir = deploy(ray_head, tmp_path, "rock-e2e-deploy")
    url = ray_head.url
    with httpx.Client(base_url=url, timeout=60) as api:
        resp = api.post("/v1/sandboxes", json={"ttl_seconds": 120})
        assert resp.status_code == 201, resp.text
        sid = resp.json()["id"]
        out = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "echo deployed"}).json()
        assert out["stdout"] == "deployed\n"
        assert api.delete(f"/v1/sandboxes/{sid}").status_code == 204
    assert list(state_dir.iterdir()) == []
