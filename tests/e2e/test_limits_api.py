"""Limits through the whole stack: client -> Serve proxy -> Admin -> Worker -> rocklet (bwrap).

The Worker-level attacks are in ``tests/security/test_limits.py``; here each limit is hit over
HTTP, to check the Admin's own body limit and that each refusal arrives as the one error body
with its status (413 too_large, 409 resource_exhausted, 400 invalid_request, 409
sandbox_failed), and that the sandbox still works afterwards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from rock_serve.config import parse_runtime_config
from rock_serve.rocklet.agent import MAX_HEADER

from .conftest import Platform, _wait_healthy, delete_app

pytestmark = [pytest.mark.ray, pytest.mark.bwrap]

READ_CAP = 1 << 20
BODY_CAP = 8 << 20
SESSIONS = 3


@pytest.fixture(scope="module")
def limited(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """An app of its own (own Ray namespace, Scheduler and Worker) with small limits."""
    from ray import serve

    from rock_serve.deployments.app import build_app
    from tests.contract.conftest import TEST_CGROUP_PARENT, bwrap_unavailable

    reason = bwrap_unavailable()
    if reason is not None:
        pytest.skip(reason)
    state_dir = tmp_path_factory.mktemp("rock-limits-state")
    args = {
        "runtime": {
            "type": "bwrap",
            "state_dir": str(state_dir),
            "cgroup_parent": TEST_CGROUP_PARENT,
        },
        "namespace": "rock-e2e-limits",
        "reap_interval_seconds": 0.2,
        "max_read_bytes": READ_CAP,
        "max_request_bytes": BODY_CAP,
        "max_sessions_per_sandbox": SESSIONS,
        # Short enough for the stopped-rocklet test, long enough that a busy CPU (CI) does not
        # fail the other tests' sandboxes: 2 s did, at load 90.
        "rocklet_ping_interval_seconds": 0.5,
        "rocklet_ping_timeout_seconds": 8.0,
    }
    serve.run(build_app(args), name="limits", route_prefix="/limits")
    url = f"{platform.url}/limits"
    _wait_healthy(url, time.monotonic() + 60)
    yield Platform(url=url, state_dir=state_dir, runtime="bwrap")
    delete_app("limits", "rock-e2e-limits")
    # The Worker actor dies without closing its runtime: release what it holds on the host
    # (bwrap's user-namespace mounts in the state dir) with a runtime of the same config.
    runtime = parse_runtime_config(args["runtime"]).build()
    asyncio.run(runtime.close())


@pytest.fixture
def api(limited: Platform) -> Iterator[httpx.Client]:
    with limited.client() as client:
        yield client
        for item in client.get("/v1/sandboxes").json()["items"]:
            client.delete(f"/v1/sandboxes/{item['id']}")


def _error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"]["code"] == code, body
    return body["error"]


def _sandbox(api: httpx.Client, **fields: object) -> str:
    resp = api.post("/v1/sandboxes", json={"ttl_seconds": 300, **fields})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _works(api: httpx.Client, sid: str) -> None:
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "echo alive"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["stdout"] == "alive\n"
    assert api.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"


def test_absurd_and_over_the_node_resources_are_refused(api):
    for resources in ({"memory_mb": 4 * 1024 * 1024}, {"pids": 1_000_000}):
        _error(api.post("/v1/sandboxes", json={"resources": resources}), 400, "invalid_request")
    too_many = {"cpus": len(os.sched_getaffinity(0)) + 1}
    # Schema-valid, but more than this node has: its own code (the body is right elsewhere).
    err = _error(api.post("/v1/sandboxes", json={"resources": too_many}), 400, "over_capacity")
    assert err["details"]["fields"] == ["cpus"]
    assert api.get("/v1/sandboxes").json()["items"] == []


def test_bodies_over_the_admin_limit_are_413_and_the_rocklet_never_sees_them(api):
    sid = _sandbox(api)
    big = "x" * (60 << 20)  # the 60 MB exec body that used to kill the rocklet
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": f"echo {big}"})
    _error(resp, 413, "too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it comes
        yield b'{"command": "echo '
        for _ in range(BODY_CAP // (1 << 20) + 1):
            yield b"x" * (1 << 20)
        yield b'"}'

    resp = api.post(
        f"/v1/sandboxes/{sid}/exec", content=chunked(), headers={"content-type": "application/json"}
    )
    _error(resp, 413, "too_large")
    # Under the Admin's limit but over the rocklet's frame: refused by the Worker's handle.
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "x" * (MAX_HEADER + 1)})
    err = _error(resp, 413, "too_large")
    assert err["details"]["limit"] == MAX_HEADER
    _works(api, sid)


def test_reads_are_capped_with_413(api):
    sid = _sandbox(api)
    resp = api.post(
        f"/v1/sandboxes/{sid}/exec",
        json={
            "command": f"head -c {READ_CAP + 1} /dev/zero > /tmp/big && mkdir -p /tmp/d && "
            f"cp /tmp/big /tmp/d/"
        },
    )
    assert resp.json()["exit_code"] == 0, resp.text
    _error(api.get(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/big"}), 413, "too_large")
    # /dev/zero has no size to check up front: the stream stops at the cap, never 1 GB.
    received = 0
    with (
        pytest.raises(httpx.HTTPError),
        api.stream("GET", f"/v1/sandboxes/{sid}/files", params={"path": "/dev/zero"}) as resp,
    ):
        for chunk in resp.iter_bytes():
            received += len(chunk)
    assert received <= READ_CAP
    received = 0
    with (
        pytest.raises(httpx.HTTPError),
        api.stream("GET", f"/v1/sandboxes/{sid}/archive", params={"path": "/tmp/d"}) as resp,
    ):
        for chunk in resp.iter_bytes():
            received += len(chunk)
    assert received <= READ_CAP
    _works(api, sid)


def test_sessions_are_bounded_with_409(api):
    sid = _sandbox(api)
    for i in range(SESSIONS):
        resp = api.post(f"/v1/sandboxes/{sid}/sessions", json={"session": f"s{i}"})
        assert resp.status_code == 200, resp.text
    resp = api.post(f"/v1/sandboxes/{sid}/sessions", json={"session": "more"})
    err = _error(resp, 409, "resource_exhausted")
    assert err["details"]["resource"] == "sessions"
    assert api.delete(f"/v1/sandboxes/{sid}/sessions/s0").status_code == 204
    assert api.post(f"/v1/sandboxes/{sid}/sessions", json={"session": "more"}).status_code == 200
    _works(api, sid)


def _rocklet_pid(sid: str) -> int:
    """The host pid of the sandbox's rocklet: the python running the agent in its cgroup."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/cgroup") as f:
                cgroups = f.read()
        except OSError:
            continue
        python = b"python" in os.path.basename(argv[0])
        if python and b"import agent" in b" ".join(argv) and sid in cgroups:
            return int(entry)
    raise AssertionError(f"no rocklet for {sid}")


def test_a_stopped_rocklet_is_failed_over_rest(api):
    sid = _sandbox(api)
    pid = _rocklet_pid(sid)
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 90
        while api.get(f"/v1/sandboxes/{sid}").json()["state"] != "failed":
            assert time.monotonic() < deadline, "the sandbox stayed 'running' with a dead agent"
            time.sleep(0.1)
        record = api.get(f"/v1/sandboxes/{sid}").json()
        assert record["reason"] == "agent_unresponsive"
        resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "echo hi"})
        assert _error(resp, 409, "sandbox_failed")["details"]["reason"] == "agent_unresponsive"
    finally:
        os.kill(pid, signal.SIGCONT)
    assert api.delete(f"/v1/sandboxes/{sid}").status_code == 204
    _works(api, _sandbox(api))
