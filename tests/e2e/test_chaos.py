"""Chaos on a real platform: a trainer, a Worker, an Admin replica and Redis killed mid-run.

A separate app (``/chaos``, its own Ray namespace, 32 sandboxes per node, leases of 2 s, a
Redis-backed registry) in the session's Ray, so the short timings cannot disturb other tests.
What must hold: nothing leaks, nothing is lost, clients see only what the SDK retries away.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rock_serve.errors import RockError
from rock_serve.sdk import Client, RetryPolicy
from tests._redis import RedisServer, have_redis_server

from .conftest import Platform, _wait_healthy, delete_app

pytestmark = [pytest.mark.ray, pytest.mark.chaos, pytest.mark.slow]

NAMESPACE = "rock-e2e-chaos"
#: Short enough to keep the test fast, long enough that a trainer starved of CPU for a second or
#: two (CI on 2 busy cores) still renews in time: a 2 s lease lost sandboxes at load 40.
LEASE = 4.0
TRAINER = Path(__file__).parent / "jobs" / "trainer.py"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    if not have_redis_server():
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("chaos-redis"), persistent=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chaos(platform: Platform, redis_server: RedisServer, tmp_path_factory) -> Iterator[Platform]:
    from ray import serve

    from rock_serve.config import parse_server_args
    from rock_serve.deployments.admin import Admin

    state_dir = tmp_path_factory.mktemp("chaos-state")
    args = parse_server_args(
        {
            "runtime": {"type": "local", "state_dir": str(state_dir)},
            "namespace": NAMESPACE,
            "max_sandboxes_per_node": 32,
            "default_lease_seconds": LEASE,
            "reap_interval_seconds": 0.2,
            "state": {"redis_url": redis_server.url},
        }
    )
    app = Admin.options(num_replicas=2).bind(args.model_dump(mode="json"))  # type: ignore[attr-defined]
    serve.run(app, name="chaos", route_prefix="/chaos")
    url = f"{platform.url}/chaos"
    _wait_healthy(url, time.monotonic() + 60)
    yield Platform(url=url, state_dir=state_dir)
    with httpx.Client(base_url=url, timeout=30) as api:
        for item in api.get("/v1/sandboxes").json().get("items", []):
            api.delete(f"/v1/sandboxes/{item['id']}")
    delete_app("chaos", NAMESPACE)


def _owned(api: httpx.Client, owner: str) -> list[str]:
    return [r["id"] for r in api.get("/v1/sandboxes", params={"owner": owner}).json()["items"]]


def _renewed_past(api: httpx.Client, owner: str, when: float) -> bool:
    """Whether every sandbox of ``owner`` has had its lease renewed to beyond ``when``."""
    items = api.get("/v1/sandboxes", params={"owner": owner}).json()["items"]
    return bool(items) and all((r["lease_expires_at"] or 0) > when for r in items)


def _wait(check, seconds: float, what: str):
    """Wait until ``check()`` holds; ``seconds`` only bounds a hang (generous for busy CPUs)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def _start_trainer(*argv: str) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, str(TRAINER), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY"), line
    return proc, line.split()[1:]


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def test_kill_9_of_an_http_trainer_holding_20_sandboxes_leaks_nothing(chaos: Platform):
    proc, ids = _start_trainer("http", chaos.url, "20", str(LEASE), "trainer-http")
    with chaos.client() as api:
        try:
            assert len(ids) == 20
            # The heartbeats keep them alive past two leases: every lease deadline moves on.
            beyond = time.time() + 2 * LEASE
            _wait(lambda: _renewed_past(api, "trainer-http", beyond), 60, "renewals")
            assert sorted(_owned(api, "trainer-http")) == sorted(ids)
        finally:
            _kill(proc)
        killed = time.monotonic()
        _wait(lambda: not _owned(api, "trainer-http"), 60, "the leases to be reaped")
        print(f"\n20 sandboxes reaped {time.monotonic() - killed:.1f} s after kill -9")
        _wait(lambda: not set(ids) & set(chaos.runtime_ids()), 30, "the runtime to be empty")


def test_kill_9_of_a_ray_driver_reaps_its_sandboxes_by_job(chaos: Platform):
    import ray

    gcs = ray.get_runtime_context().gcs_address
    proc, ids = _start_trainer("ray", gcs, "5", NAMESPACE, "trainer-ray")
    with chaos.client() as api:
        try:
            records = [api.get(f"/v1/sandboxes/{sid}").json() for sid in ids]
            assert all(r["ray_job_id"] for r in records)
            assert all(r["lease_seconds"] == 3600 for r in records)  # only the job can end them
        finally:
            _kill(proc)
        _wait(lambda: not _owned(api, "trainer-ray"), 30, "the dead job's sandboxes")
        _wait(lambda: not set(ids) & set(chaos.runtime_ids()), 30, "the runtime to be empty")


def _worker_pid() -> int | None:
    """The Worker's pid, or None while it is restarting."""
    import ray

    from rock_serve.deployments._ray import WORKER_PREFIX

    [actor] = [
        ray.get_actor(a["name"], namespace=NAMESPACE)
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE and a["name"].startswith(WORKER_PREFIX)
    ]
    try:
        return int(ray.get(actor.pid.remote(), timeout=10))
    except ray.exceptions.RayError:
        return None


def test_kill_9_of_a_worker_leaves_no_leak_and_the_platform_goes_on(chaos: Platform):
    with chaos.client() as api:
        made = [api.post("/v1/sandboxes", json={"owner": "w"}).json()["id"] for _ in range(3)]
        before = _worker_pid()
        assert before is not None
        os.kill(before, signal.SIGKILL)
        # Ray restarts the Worker; local sandboxes died with it, so it removes their leftovers.
        _wait(lambda: _worker_pid() not in (None, before), 60, "the Worker to restart")
        _wait(lambda: not set(made) & set(chaos.runtime_ids()), 30, "leftovers to be removed")
        _wait(lambda: not _owned(api, "w"), 30, "the registry to drop them")
        resp = api.post(f"/v1/sandboxes/{made[0]}/exec", json={"command": "true"})
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "sandbox_not_found"
        fresh = api.post("/v1/sandboxes", json={})
        assert fresh.status_code == 201, fresh.text
        out = api.post(f"/v1/sandboxes/{fresh.json()['id']}/exec", json={"command": "echo ok"})
        assert out.json()["stdout"] == "ok\n"


def test_an_admin_replica_killed_under_load_fails_no_request(chaos: Platform):
    import ray

    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and "chaos#Admin" in a["name"]
    ]
    assert len(replicas) == 2
    victim = ray.get_actor(replicas[0]["name"], namespace="serve")
    pid = ray.get(victim.__ray_call__.remote(lambda self: os.getpid()))
    errors: list[BaseException] = []
    done = 0
    stop = threading.Event()
    retry = RetryPolicy(max_attempts=20, base=0.1, max_backoff=1.0)
    with Client(base_url=chaos.url, retry=retry) as client, client.sandbox() as sb:

        def load(session: str) -> None:
            nonlocal done
            while not stop.is_set():
                try:
                    assert sb.run("echo hi", session=session).output == "hi\n"
                    done += 1
                except (RockError, httpx.HTTPError, AssertionError) as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=load, args=(f"s{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        _wait(lambda: done > 50, 30, "load to build up")
        os.kill(pid, signal.SIGKILL)
        at_kill = done
        _wait(lambda: done > at_kill + 200, 60, "200 more requests after the kill")
        stop.set()
        for t in threads:
            t.join()
    print(f"\n{done} requests, {len(errors)} failed; an Admin replica was killed at {at_kill}")
    assert errors == []


def test_a_redis_restart_loses_nothing(chaos: Platform, redis_server: RedisServer):
    with chaos.client() as api:
        before = api.post("/v1/sandboxes", json={"owner": "r", "lease_seconds": 60}).json()["id"]
        redis_server.restart(kill=True)
        during = api.post("/v1/sandboxes", json={"owner": "r", "lease_seconds": 60})
        assert during.status_code == 201, during.text
        _wait(lambda: api.get("/v1/health").json()["state_store_ok"], 30, "the store to recover")
        assert sorted(_owned(api, "r")) == sorted([before, during.json()["id"]])
        for sid in _owned(api, "r"):
            assert api.delete(f"/v1/sandboxes/{sid}").status_code == 204
