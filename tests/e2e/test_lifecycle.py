"""Leases, heartbeats, delete-by-token and streamed bodies, over HTTP on the real platform."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
import time
from collections.abc import Iterator

import httpx
import pytest

from rock_serve.protocol import SandboxRecord
from tests._wait import wait_until

pytestmark = pytest.mark.ray


def _create(api: httpx.Client, **body) -> SandboxRecord:
    resp = api.post("/v1/sandboxes", json=body)
    assert resp.status_code == 201, resp.text
    return SandboxRecord.model_validate(resp.json())


OWNER = {"owner": "lease-test"}


def test_an_unrenewed_lease_is_reaped_and_a_late_call_says_why(api):
    sb = _create(api, lease_seconds=1.0, owner="lease-test")
    assert sb.lease_seconds == 1.0 and sb.lease_expires_at is not None
    assert [h.state for h in sb.history] == ["pending", "starting", "running"]
    renewed = SandboxRecord.model_validate(api.post(f"/v1/sandboxes/{sb.id}/renew").json())
    assert renewed.lease_expires_at is not None and renewed.lease_expires_at > sb.lease_expires_at
    # Listing renews nothing: wait for the reaper (every 0.2 s here) to end the lease. (The
    # rules themselves are unit-tested with a fake clock in tests/unit/test_lifetime.py.)
    wait_until(
        lambda: (
            sb.id not in [r["id"] for r in api.get("/v1/sandboxes", params=OWNER).json()["items"]]
        ),
        what="the unrenewed lease to be reaped",
    )
    resp = api.post(f"/v1/sandboxes/{sb.id}/exec", json={"command": "true"})
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert error["code"] == "sandbox_not_found" and "lease_expired" in error["message"]


def test_lease_over_the_limit_is_refused(api):
    resp = api.post("/v1/sandboxes", json={"lease_seconds": 10**6})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_request"


def test_delete_by_client_token(api):
    sb = _create(api, client_token="delete-me-please")
    assert (
        api.delete("/v1/sandboxes", params={"client_token": "delete-me-please"}).status_code == 204
    )
    assert api.get(f"/v1/sandboxes/{sb.id}").status_code == 404
    again = api.delete("/v1/sandboxes", params={"client_token": "delete-me-please"})
    assert again.status_code == 404 and again.json()["error"]["code"] == "sandbox_not_found"


def _body(data: bytes, piece: int = 256 << 10) -> Iterator[bytes]:
    for i in range(0, len(data), piece):
        yield data[i : i + piece]


def test_large_files_and_archives_stream_both_ways(api):
    sb = _create(api)
    base = f"/v1/sandboxes/{sb.id}"
    try:
        data = os.urandom(9 << 20) + b"tail"
        resp = api.put(f"{base}/files", params={"path": "big.bin"}, content=_body(data))
        assert resp.status_code == 200, resp.text
        assert resp.json()["size"] == len(data)
        digest = hashlib.sha256()
        size = 0
        with api.stream("GET", f"{base}/files", params={"path": "big.bin"}) as got:
            assert got.status_code == 200
            for chunk in got.iter_bytes():
                digest.update(chunk)
                size += len(chunk)
        assert size == len(data) and digest.digest() == hashlib.sha256(data).digest()

        tar_bytes = api.get(f"{base}/archive", params={"path": "big.bin"}).content
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            [name] = tar.getnames()
            member = tar.extractfile(name)
            assert name.endswith("big.bin") and member is not None and member.read() == data

        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            info = tarfile.TarInfo("dir/copy.bin")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        resp = api.put(f"{base}/archive", params={"path": "x"}, content=_body(out.getvalue()))
        assert resp.status_code == 204, resp.text
        stat = api.get(f"{base}/files/stat", params={"path": "x/dir/copy.bin"}).json()
        assert stat["size"] == len(data)

        missing = api.get(f"{base}/files", params={"path": "nope"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"
        empty = api.put(f"{base}/files", params={"path": "empty"}, content=b"")
        assert empty.status_code == 200 and empty.json()["size"] == 0
        assert api.get(f"{base}/files", params={"path": "empty"}).content == b""
    finally:
        api.delete(base)


def test_a_failed_streamed_upload_leaves_no_partial_file(api):
    sb = _create(api)
    base = f"/v1/sandboxes/{sb.id}"
    try:
        resp = api.put(
            f"{base}/files", params={"path": "../../outside"}, content=_body(os.urandom(3 << 20))
        )
        assert resp.status_code >= 400 and "error" in resp.json()
        resp = api.put(f"{base}/archive", params={"path": "t"}, content=_body(b"x" * (3 << 20)))
        assert resp.status_code == 400, resp.text
        assert api.post(f"{base}/exec", json={"command": "true"}).status_code == 200
    finally:
        api.delete(base)


def test_the_sdk_heartbeat_keeps_a_leased_sandbox_alive(platform):
    from rock_serve.sdk import AsyncClient, Client

    with Client(base_url=platform.url) as client:
        with client.sandbox(lease_seconds=0.6) as sb:
            beat = sb._heartbeat
            assert beat is not None and beat.interval == 0.2
            deadline = time.monotonic() + 10
            while beat.beats < 8 and time.monotonic() < deadline:  # > 2 leases of beats
                time.sleep(0.1)
            assert sb.run("echo alive").output == "alive\n"
        assert beat._thread is None  # stopped on exit

    async def scenario() -> None:
        async with AsyncClient(base_url=platform.url) as client:
            async with client.sandbox(lease_seconds=0.6) as sb:
                beat = sb._heartbeat
                assert beat is not None
                loop_deadline = time.monotonic() + 10
                while beat.beats < 8 and time.monotonic() < loop_deadline:
                    await asyncio.sleep(0.1)
                assert (await sb.run("echo alive")).output == "alive\n"

    asyncio.run(scenario())
