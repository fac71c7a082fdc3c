"""Platform metrics reach Ray's Prometheus endpoint."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.ray

WANTED = (
    "ray_rock_sandboxes{",
    "ray_rock_create_seconds_bucket{",
    "ray_rock_op_seconds_bucket{",
    'code="sandbox_not_found"',
)


def test_metrics_are_exported(platform, api):
    created = api.post("/v1/sandboxes", json={"owner": "metrics"}).json()
    sandbox_id = created["id"]
    assert api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"command": "true"}).status_code == 200
    assert api.get("/v1/sandboxes/sb-000000000000-00000000").status_code == 404
    api.delete(f"/v1/sandboxes/{sandbox_id}")
    deadline = time.monotonic() + 60  # Ray exports every few seconds
    text = ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{platform.metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            text = ""
        if all(w in text for w in WANTED):
            break
        time.sleep(1)
    missing = [w for w in WANTED if w not in text]
    assert missing == [], f"not exported: {missing}"
