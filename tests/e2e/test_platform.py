"""The Serve app end to end over HTTP: Admin -> Scheduler / Worker -> rocklet."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from rock_serve.protocol import (
    ExecResult,
    FileInfo,
    Health,
    ListDirResult,
    SandboxList,
    SandboxRecord,
    SandboxStats,
    SessionRunResult,
)
from rock_serve.protocol.api import SANDBOX_ID

from .conftest import CAPACITY, Platform

pytestmark = pytest.mark.ray


def _create(api: httpx.Client, **body) -> SandboxRecord:
    resp = api.post("/v1/sandboxes", json=body)
    assert resp.status_code == 201, resp.text
    return SandboxRecord.model_validate(resp.json())


def _error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    return body["error"]


def test_health_and_docs(api):
    health = Health.model_validate(api.get("/v1/health").json())
    assert health.status == "ok"
    assert [(w.alive, w.runtime, w.capacity) for w in health.workers] == [(True, "local", CAPACITY)]
    assert api.get("/docs").status_code == 200
    spec = api.get("/openapi.json")
    assert spec.status_code == 200, spec.text
    paths = spec.json()["paths"]
    assert "/v1/sandboxes/{sandbox_id}/sessions/{session}/run" in paths


def test_lifecycle_sessions_exec_files(api, platform: Platform):
    sb = _create(api, owner="alice", labels={"task": "t1"}, ttl_seconds=300)
    assert re.match(SANDBOX_ID, sb.id)
    assert sb.state == "running" and sb.owner == "alice" and sb.expires_at is not None
    base = f"/v1/sandboxes/{sb.id}"
    assert SandboxRecord.model_validate(api.get(base).json()) == sb
    listed = SandboxList.model_validate(api.get("/v1/sandboxes", params={"owner": "alice"}).json())
    assert [r.id for r in listed.items] == [sb.id]
    assert api.get("/v1/sandboxes", params={"label": "task=other"}).json()["items"] == []
    assert len(api.get("/v1/sandboxes", params={"label": "task=t1"}).json()["items"]) == 1

    # A session keeps cwd and env between commands.
    resp = api.post(f"{base}/sessions", json={"session": "s1"})
    assert resp.status_code == 200, resp.text
    run = api.post(f"{base}/sessions/s1/run", json={"command": "mkdir -p w && cd w && X=42"})
    assert SessionRunResult.model_validate(run.json()).exit_code == 0
    run = SessionRunResult.model_validate(
        api.post(f"{base}/sessions/s1/run", json={"command": "echo $X; basename $PWD"}).json()
    )
    assert (run.output, run.exit_code) == ("42\nw\n", 0)

    # Streamed session output: chunks, then the result.
    resp = api.post(
        f"{base}/sessions/s1/run", params={"stream": "true"}, json={"command": "echo a; echo b"}
    )
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in resp.text.splitlines()]
    assert "".join(x["data"] for x in lines[:-1]) == "a\nb\n"
    assert SessionRunResult.model_validate(lines[-1]).exit_code == 0

    # One-shot exec, plain and streamed.
    res = ExecResult.model_validate(
        api.post(f"{base}/exec", json={"command": "echo out; echo err >&2; exit 3"}).json()
    )
    assert (res.stdout, res.stderr, res.exit_code) == ("out\n", "err\n", 3)
    resp = api.post(f"{base}/exec", params={"stream": "true"}, json={"command": ["echo", "hi"]})
    lines = [json.loads(line) for line in resp.text.splitlines()]
    assert lines[0] == {"type": "output", "stream": "stdout", "data": "hi\n", "encoding": "utf-8"}
    assert ExecResult.model_validate(lines[-1]).exit_code == 0

    # Binary files round trip, with permissions; stat, list, mkdir, remove.
    blob = bytes(range(256)) * 1000
    resp = api.put(f"{base}/files", params={"path": "d/blob.bin", "mode": "600"}, content=blob)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"path": "d/blob.bin", "size": len(blob)}
    got = api.get(f"{base}/files", params={"path": "d/blob.bin"})
    assert got.status_code == 200 and got.content == blob
    info = FileInfo.model_validate(
        api.get(f"{base}/files/stat", params={"path": "d/blob.bin"}).json()
    )
    assert (info.size, info.mode & 0o777, info.type) == (len(blob), 0o600, "file")
    assert api.post(f"{base}/files/mkdir", json={"path": "d/sub"}).status_code == 204
    listing = ListDirResult.model_validate(
        api.get(f"{base}/files/list", params={"path": "d"}).json()
    )
    assert [e.name for e in listing.entries] == ["blob.bin", "sub"]
    assert (
        api.post(f"{base}/files/remove", json={"path": "d", "recursive": True}).status_code == 204
    )
    _error(api.get(f"{base}/files/stat", params={"path": "d"}), 404, "file_not_found")
    assert SandboxStats.model_validate(api.get(f"{base}/stats").json()).pids_current >= 1

    # Close the session; then it is unknown.
    assert api.delete(f"{base}/sessions/s1").status_code == 204
    _error(api.post(f"{base}/sessions/s1/run", json={"command": "true"}), 404, "session_not_found")

    assert api.delete(base).status_code == 204
    _error(api.get(base), 404, "sandbox_not_found")
    _error(api.post(f"{base}/exec", json={"command": "true"}), 404, "sandbox_not_found")
    assert api.get("/v1/sandboxes").json()["items"] == []
    assert sb.id not in platform.runtime_ids()


def _when_busy(api: httpx.Client, base: str, session: str) -> None:
    """Wait until a command runs in the session (an empty stdin write succeeds only then)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        resp = api.post(f"{base}/sessions/{session}/stdin", json={"data": ""})
        if resp.status_code == 204:
            return
        _error(resp, 409, "conflict")
        time.sleep(0.05)
    raise AssertionError("the command never started")


def _run_in_thread(platform: Platform, base: str, session: str, command: str) -> dict:
    out: dict = {}

    def run() -> None:
        with platform.client() as client:
            out["resp"] = client.post(
                f"{base}/sessions/{session}/run", json={"command": command, "timeout": 30}
            )

    thread = threading.Thread(target=run)
    thread.start()
    out["thread"] = thread
    return out


def test_session_stdin_and_interrupt(api, platform: Platform):
    base = f"/v1/sandboxes/{_create(api).id}"
    assert api.post(f"{base}/sessions", json={}).status_code == 200

    job = _run_in_thread(platform, base, "default", "read line; echo got $line")
    _when_busy(api, base, "default")
    assert api.post(f"{base}/sessions/default/stdin", json={"data": "hello\n"}).status_code == 204
    job["thread"].join(30)
    result = SessionRunResult.model_validate(job["resp"].json())
    assert (result.output, result.exit_code) == ("got hello\n", 0)

    job = _run_in_thread(platform, base, "default", "sleep 60")
    _when_busy(api, base, "default")
    assert api.post(f"{base}/sessions/default/interrupt").status_code == 204
    job["thread"].join(30)
    result = SessionRunResult.model_validate(job["resp"].json())
    assert result.exit_code == 130 and result.duration < 30


def test_typed_errors(api):
    unknown = "sb-000000000000-0123456789abcdef"
    _error(api.get(f"/v1/sandboxes/{unknown}"), 404, "sandbox_not_found")
    _error(api.delete(f"/v1/sandboxes/{unknown}"), 404, "sandbox_not_found")
    _error(
        api.post(f"/v1/sandboxes/{unknown}/exec", json={"command": "x"}), 404, "sandbox_not_found"
    )
    _error(api.get("/v1/sandboxes/not-an-id"), 404, "sandbox_not_found")
    _error(api.post("/v1/sandboxes", json={"bogus": 1}), 400, "invalid_request")
    _error(
        api.post(
            "/v1/sandboxes", content=b"{not json", headers={"content-type": "application/json"}
        ),
        400,
        "invalid_request",
    )
    _error(api.post("/v1/sandboxes", json={"ttl_seconds": 7200}), 400, "invalid_request")
    _error(api.get("/v1/nowhere"), 404, "not_found")
    _error(api.get("/v1/sandboxes", params={"label": "novalue"}), 400, "invalid_request")

    base = f"/v1/sandboxes/{_create(api).id}"
    _error(
        api.post(f"{base}/sessions/nope/run", json={"command": "true"}), 404, "session_not_found"
    )
    _error(api.post(f"{base}/exec", json={"command": ""}), 400, "invalid_request")
    _error(api.get(f"{base}/files", params={"path": "missing.txt"}), 404, "file_not_found")
    _error(
        api.put(f"{base}/files", params={"path": "x", "mode": "999"}, content=b""),
        400,
        "invalid_request",
    )
    assert api.post(f"{base}/sessions", json={"session": "a"}).status_code == 200
    _error(api.post(f"{base}/sessions", json={"session": "a"}), 409, "session_exists")
    _error(
        api.post(f"{base}/sessions/bad name!/run", json={"command": "x"}), 400, "invalid_request"
    )


def test_capacity_gives_429_with_retry_after(api, platform: Platform):
    ids = [_create(api).id for _ in range(CAPACITY)]
    resp = api.post("/v1/sandboxes", json={})
    err = _error(resp, 429, "rate_limited")
    assert err["retry_after"] > 0 and int(resp.headers["retry-after"]) >= 1
    for sid in ids:
        assert api.delete(f"/v1/sandboxes/{sid}").status_code == 204
    assert platform.runtime_ids() == []


def test_ttl_reaps_sandbox(api, platform: Platform):
    sb = _create(api, ttl_seconds=1)
    deadline = time.monotonic() + 20
    while api.get(f"/v1/sandboxes/{sb.id}").status_code == 200:
        assert time.monotonic() < deadline, "sandbox outlived its TTL"
        time.sleep(0.1)
    # The Worker removed it from the runtime too (not only hidden from the registry).
    while sb.id in platform.runtime_ids():
        assert time.monotonic() < deadline, "runtime still has the expired sandbox"
        time.sleep(0.1)
    _error(
        api.post(f"/v1/sandboxes/{sb.id}/exec", json={"command": "true"}), 404, "sandbox_not_found"
    )


def test_failed_create_leaves_nothing(api, platform: Platform):
    # The local runtime has no images: the create fails in the runtime, on the Worker.
    _error(api.post("/v1/sandboxes", json={"image": "ubuntu:24.04"}), 400, "invalid_config")
    assert api.get("/v1/sandboxes").json()["items"] == []
    assert platform.runtime_ids() == []
    # And capacity is not consumed by the failures.
    health = Health.model_validate(api.get("/v1/health").json())
    assert [w.sandboxes for w in health.workers] == [0]


def test_create_that_fails_to_start_leaves_nothing(broken_platform: Platform):
    # The runtime creates the sandbox, then its rocklet exits at start: the Worker removes it.
    with broken_platform.client() as api:
        resp = api.post("/v1/sandboxes", json={"owner": "bob"})
        assert resp.status_code >= 400, resp.text
        assert resp.json()["error"]["code"] in {"rocklet_unavailable", "runtime_unavailable"}, (
            resp.text
        )
        assert api.get("/v1/sandboxes").json()["items"] == []
        assert broken_platform.runtime_ids() == []
        assert list(broken_platform.state_dir.iterdir()) == []


@pytest.mark.bwrap
def test_bwrap_sandbox_and_missing_rootfs(bwrap_platform: Platform, tmp_path):
    with bwrap_platform.client() as api:
        sb = _create(api, resources={"memory_mb": 256})
        base = f"/v1/sandboxes/{sb.id}"
        res = api.post(f"{base}/exec", json={"command": "echo $((6*7)); id -u"}).json()
        assert ExecResult.model_validate(res).stdout == "42\n0\n"
        assert api.delete(base).status_code == 204

        missing = tmp_path / "no-such-rootfs"
        _error(api.post("/v1/sandboxes", json={"image": str(missing)}), 404, "image_not_found")
        assert api.get("/v1/sandboxes").json()["items"] == []
        assert bwrap_platform.runtime_ids() == []
