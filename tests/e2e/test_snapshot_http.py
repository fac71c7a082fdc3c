"""Snapshots through the real platform (issue 16): the HTTP routes, the SDK and the CLI.

The bwrap app of the session's Ray (``bwrap_platform``, node store only: no S3), over HTTP, the
SDK, the CLI and the Ray transport; archive on lease expiry and resume. Through S3
across two nodes, corrupt archives, namespaces and retention: tests/integration/
test_snapshot_api.py.
"""

from __future__ import annotations

import httpx
import pytest
from typer.testing import CliRunner

from rock_serve.errors import NotFound
from rock_serve.sdk import AsyncClient
from rock_serve.sdk.cli._app import app as cli
from tests._wait import wait_until

pytestmark = [pytest.mark.ray, pytest.mark.bwrap]


async def test_snapshot_routes_sdk_and_cli(bwrap_platform):
    url = bwrap_platform.url
    async with AsyncClient(url) as client, client.sandbox(env={"TOKEN": "s3cret"}) as sb:
        await sb.exec("mkdir -p /work && echo saved > /work/state")
        with httpx.Client(base_url=url, timeout=120) as api:
            made = api.post(f"/v1/sandboxes/{sb.id}/snapshot", json={"labels": {"k": "v"}})
            assert made.status_code == 201, made.text
            body = made.json()
            assert body["id"].startswith("snap-") and body["sandbox_id"] == sb.id
            assert body["labels"] == {"k": "v"} and body["size"] > 0 and body["in_s3"] is False
            assert "TOKEN" in body["env_keys"] and "s3cret" not in made.text
            snap_id = body["id"]
            assert api.get(f"/v1/snapshots/{snap_id}").json() == body
            assert snap_id in [s["id"] for s in api.get("/v1/snapshots").json()["items"]]
            created = api.post("/v1/sandboxes", json={"snapshot": snap_id})
            assert created.status_code == 201, created.text
            restored = created.json()["id"]
            out = api.post(f"/v1/sandboxes/{restored}/exec", json={"command": "cat /work/state"})
            assert out.json()["stdout"] == "saved\n"
            assert api.delete(f"/v1/sandboxes/{restored}").status_code == 204

            unknown = api.get("/v1/snapshots/snap-0000000000000000")
            assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
            bad = api.post("/v1/sandboxes", json={"snapshot": "snap-0000000000000000"})
            assert bad.status_code == 404 and bad.json()["error"]["code"] == "not_found"
            bad = api.post("/v1/sandboxes", json={"snapshot": "../etc"})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
            gone = api.post("/v1/sandboxes/sb-abcdef123456-0000000000000000/snapshot", json={})
            assert gone.status_code == 404

        # The SDK: sb.snapshot(), client.snapshots, create(snapshot=...).
        await sb.exec("echo two > /work/state")
        snap = await sb.snapshot()
        assert (await client.snapshots.get(snap.id)).digest == snap.digest
        async with client.sandbox(snapshot=snap.id) as copy:
            assert (await copy.exec("cat /work/state")).stdout == "two\n"
        await client.snapshots.delete(snap.id)
        with pytest.raises(NotFound):
            await client.snapshots.get(snap.id)

        # The CLI.
        runner = CliRunner()
        made_cli = runner.invoke(cli, ["sandbox", "snapshot", sb.id, "--url", url])
        assert made_cli.exit_code == 0, made_cli.output
        cli_id = made_cli.output.strip()
        listed = runner.invoke(cli, ["snapshot", "ls", "--url", url])
        assert listed.exit_code == 0 and cli_id[:12] in listed.output
        back = runner.invoke(cli, ["sandbox", "create", "--snapshot", cli_id, "--url", url])
        assert back.exit_code == 0, back.output
        copy_id = back.output.strip()
        out = await client.exec(copy_id, "cat /work/state")
        assert out.stdout == "two\n"
        await client.delete_sandbox(copy_id)
        assert runner.invoke(cli, ["snapshot", "rm", cli_id, snap_id, "--url", url]).exit_code == 0
        assert await client.snapshots.list() == []


def test_archive_on_lease_expiry_and_resume_over_http(bwrap_platform):
    with httpx.Client(base_url=bwrap_platform.url, timeout=120) as api:
        # The file is there from birth (the sandbox is made over a snapshot of one that wrote
        # it): a write after the create would race the 1 s lease on a busy host.
        source = api.post("/v1/sandboxes", json={"ttl_seconds": 300}).json()["id"]
        wrote = api.post(f"/v1/sandboxes/{source}/exec", json={"command": "echo kept > /root/kept"})
        assert wrote.status_code == 200 and wrote.json()["exit_code"] == 0, wrote.text
        seed = api.post(f"/v1/sandboxes/{source}/snapshot", json={}).json()["id"]
        assert api.delete(f"/v1/sandboxes/{source}").status_code == 204
        body = {"snapshot": seed, "archive_on_expiry": True, "lease_seconds": 1}
        made = api.post("/v1/sandboxes", json=body)
        assert made.status_code == 201, made.text
        sid = made.json()["id"]

        def archived() -> list[dict[str, object]]:
            items = api.get("/v1/snapshots").json()["items"]
            return [s for s in items if s["archived"] and s["sandbox_id"] == sid]

        snaps = wait_until(archived, timeout=60, what="the archive of the lease-expired sandbox")
        assert api.get(f"/v1/sandboxes/{sid}").status_code == 404  # reaped: archived
        back = api.post(f"/v1/sandboxes/{sid}/resume")
        assert back.status_code == 200, back.text
        assert back.json()["id"] == sid and back.json()["state"] == "running"
        out = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "cat /root/kept"})
        assert out.json()["stdout"] == "kept\n"
        assert api.get(f"/v1/snapshots/{snaps[0]['id']}").status_code == 404
        assert api.delete(f"/v1/sandboxes/{sid}").status_code == 204
        assert api.delete(f"/v1/snapshots/{seed}").status_code == 204
        missing = api.post("/v1/sandboxes/sb-abcdef123456-0000000000000000/resume")
        assert missing.status_code == 404


def test_a_snapshot_of_a_sandbox_made_from_a_snapshot_keeps_its_files(bwrap_platform):
    with httpx.Client(base_url=bwrap_platform.url, timeout=120) as api:
        made: list[str] = []
        snaps: list[str] = []
        try:
            made.append(api.post("/v1/sandboxes", json={"ttl_seconds": 300}).json()["id"])
            wrote = api.post(f"/v1/sandboxes/{made[0]}/exec", json={"command": "echo a > /root/a"})
            assert wrote.status_code == 200, wrote.text
            snaps.append(api.post(f"/v1/sandboxes/{made[0]}/snapshot", json={}).json()["id"])
            made.append(api.post("/v1/sandboxes", json={"snapshot": snaps[0]}).json()["id"])
            snaps.append(api.post(f"/v1/sandboxes/{made[1]}/snapshot", json={}).json()["id"])
            made.append(api.post("/v1/sandboxes", json={"snapshot": snaps[1]}).json()["id"])
            out = api.post(f"/v1/sandboxes/{made[2]}/exec", json={"command": "cat /root/a"})
            assert out.json()["stdout"] == "a\n", out.text
        finally:
            for sid in made:
                api.delete(f"/v1/sandboxes/{sid}")
            for snap in snaps:
                api.delete(f"/v1/snapshots/{snap}")


async def test_snapshots_over_the_ray_transport(bwrap_platform):
    client = AsyncClient.from_ray(namespace="rock-e2e-bwrap")
    async with client, client.sandbox() as sb:
        await sb.exec("echo ray > /root/r")
        snap = await sb.snapshot(labels={"via": "ray"})
        assert snap.labels == {"via": "ray"}
        assert snap.id in [s.id for s in await client.snapshots.list()]
        assert (await client.snapshots.get(snap.id)).digest == snap.digest
        async with client.sandbox(snapshot=snap.id) as copy:
            assert (await copy.exec("cat /root/r")).stdout == "ray\n"
        await client.snapshots.delete(snap.id)
        with pytest.raises(NotFound):
            await client.snapshots.get(snap.id)
