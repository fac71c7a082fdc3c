"""One real Ray + Serve per test session, running the rock-serve app on the local runtime.

Ray is started with ``address="local"`` (never another cluster on the machine), its own short
temp dir and a free HTTP port. Teardown deletes every sandbox through the API, then stops Serve
and this Ray only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from rock_serve.auth import generate_token, hash_token
from rock_serve.config import BwrapRuntimeConfig, LocalRuntimeConfig
from tests._wait import wait_until
from tests.e2e._head import BIN, Head, deploy
from tests.e2e._head import ray_head as start_ray_head

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

#: Small limits so that capacity and TTL behaviour show quickly.
CAPACITY = 4


@dataclass
class Platform:
    url: str
    state_dir: Path
    python: str | None = None
    runtime: str = "local"
    metrics_port: int | None = None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def _runtime_config(self) -> LocalRuntimeConfig | BwrapRuntimeConfig:
        if self.runtime == "bwrap":
            from tests.contract.conftest import TEST_CGROUP_PARENT

            return BwrapRuntimeConfig(
                state_dir=str(self.state_dir), cgroup_parent=TEST_CGROUP_PARENT
            )
        return LocalRuntimeConfig(state_dir=str(self.state_dir), python=self.python)

    def runtime_ids(self) -> list[str]:
        """Ids the runtime itself still knows (what a leak would show up in)."""

        async def _list() -> list[str]:
            rt = self._runtime_config().build()
            try:
                return [info.id for info in await rt.list()]
            finally:
                await rt.close()

        return asyncio.run(_list())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def delete_app(name: str, namespace: str) -> None:
    """Delete Serve app ``name`` and stop its platform's actors in Ray namespace ``namespace``
    (each Worker's ``shutdown`` first: it removes what is left of its sandboxes).

    ``serve.delete`` alone leaves the detached Scheduler and Workers running, each with its
    reaper ticking every 0.2 s: a dozen left over from the modules before slowed every later
    test of the session.
    """
    import ray
    from ray import serve

    from rock_serve.deployments._ray import WORKER_PREFIX

    serve.delete(name)
    actors = [
        (a["name"], ray.get_actor(a["name"], namespace=namespace))
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == namespace
    ]
    for actor_name, actor in actors:
        if actor_name.startswith(WORKER_PREFIX):
            with contextlib.suppress(Exception):
                ray.get(actor.shutdown.remote(), timeout=120)
    for _, actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
    left = lambda: [  # noqa: E731
        a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace
    ]
    wait_until(lambda: not left(), what=f"the actors of {namespace} to stop")


def _wait_healthy(url: str, deadline: float) -> None:
    last: object = None
    with httpx.Client(base_url=url, timeout=10) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                resp = client.get("/v1/health")
                last = resp.text
                if resp.status_code == 200 and resp.json()["status"] == "ok":
                    return
            time.sleep(0.2)
    raise AssertionError(f"platform not healthy: {last}")


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from rock_serve.deployments.app import build_app

    temp_dir = tempfile.mkdtemp(prefix="rse2e-", dir="/tmp")  # short: socket paths
    state_dir = tmp_path_factory.mktemp("rock-state")
    metrics_port = _free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        _metrics_export_port=metrics_port,
        log_to_driver=False,
    )
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {
            "runtime": {"type": "local", "state_dir": str(state_dir)},
            "namespace": "rock-e2e",
            "max_sandboxes_per_node": CAPACITY,
            "default_ttl_seconds": 600,
            "max_ttl_seconds": 3600,
            "reap_interval_seconds": 0.2,
        }
        serve.run(build_app(args), name="rock", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, time.monotonic() + 60)
        yield Platform(url=url, state_dir=state_dir, metrics_port=metrics_port)
        with httpx.Client(base_url=url, timeout=30) as client:
            for item in client.get("/v1/sandboxes").json().get("items", []):
                client.delete(f"/v1/sandboxes/{item['id']}")
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        if not os.environ.get("ROCK_E2E_KEEP_TMP"):  # keep Ray logs for debugging
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def api(platform: Platform) -> Iterator[httpx.Client]:
    with platform.client() as client:
        yield client
        # Every test leaves the platform empty.
        for item in client.get("/v1/sandboxes").json()["items"]:
            client.delete(f"/v1/sandboxes/{item['id']}")


@pytest.fixture(scope="session")
def broken_platform(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Platform:
    """A second app in the same Ray whose sandboxes cannot start (their rocklet exits at once).

    It has its own Ray namespace (so its own Scheduler and Worker) and answers under /broken.
    """
    from ray import serve

    from rock_serve.deployments.app import build_app

    state_dir = tmp_path_factory.mktemp("rock-broken-state")
    args = {
        "runtime": {"type": "local", "state_dir": str(state_dir), "python": "/bin/false"},
        "namespace": "rock-e2e-broken",
        "reap_interval_seconds": 0.2,
    }
    serve.run(build_app(args), name="broken", route_prefix="/broken")
    url = f"{platform.url}/broken"
    _wait_healthy(url, time.monotonic() + 60)
    return Platform(url=url, state_dir=state_dir, python="/bin/false")


def _bwrap_app(
    platform: Platform,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    runtime_extra: dict[str, Any],
) -> Platform:
    """An app on the bwrap runtime in the session's Ray, under ``/<name>`` (skipped without
    bwrap)."""
    from tests.contract.conftest import TEST_CGROUP_PARENT, bwrap_unavailable

    reason = bwrap_unavailable()
    if reason is not None:
        pytest.skip(reason)
    from ray import serve

    from rock_serve.deployments.app import build_app

    state_dir = tmp_path_factory.mktemp(f"rock-{name}-state")
    args = {
        "runtime": {
            "type": "bwrap",
            "state_dir": str(state_dir),
            "cgroup_parent": TEST_CGROUP_PARENT,
            **runtime_extra,
        },
        "namespace": f"rock-e2e-{name}",
        "reap_interval_seconds": 0.2,
    }
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    url = f"{platform.url}/{name}"
    _wait_healthy(url, time.monotonic() + 60)
    return Platform(url=url, state_dir=state_dir, runtime="bwrap")


@pytest.fixture(scope="session")
def bwrap_host_tools_platform(
    platform: Platform, tmp_path_factory: pytest.TempPathFactory
) -> Platform:
    """The bwrap runtime without an image store, under /bwrap-host: its sandboxes' root is the
    host-tools allow-list (/usr, /bin, /lib*, filtered /etc), so the host's toolchains (gcc,
    node, java) are there, as an operator enabling that mode would have them."""
    return _bwrap_app(platform, tmp_path_factory, "bwrap-host", {"images": None})


@pytest.fixture(scope="session")
def bwrap_platform(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Platform:
    """A third app in the same Ray on the bwrap runtime, under /bwrap (skipped without bwrap)."""
    return _bwrap_app(platform, tmp_path_factory, "bwrap", {})


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    """A separate `ray start --head` (own ports, temp dir, process group) per test module.

    Not shared across modules: a redeploy with other args does not rebuild the Workers, which
    keep the runtime they started with (a known gap), so each deploy test gets a fresh head.
    """
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray CLI is not installed")
    with start_ray_head() as head:
        yield head


@dataclass
class JobsHead:
    """The Ray-job modules' head: serve_config.yaml deployed twice on it (see ``jobs_head``)."""

    head: Head
    #: The open platform (auth disabled, no audit file) and its local runtime's state dir.
    namespace: str
    state_dir: Path
    #: The same YAML with a token per caller and an audit log, under ``/rayauth``.
    auth_namespace: str
    tokens: dict[str, str]
    audit: Path


@pytest.fixture(scope="session")
def jobs_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobsHead]:
    """One `ray start --head` for the modules that submit Ray jobs (test_ray_job,
    test_rllib_ppo, test_ray_transport_auth): each deployed serve_config.yaml on a head of its
    own, with one of these two configs; a head and a deploy cost ~25 s each in CI. Nothing is
    redeployed, so the Workers' "keep their first runtime" gap (``ray_head``) does not apply;
    each module leaves no sandbox behind (they check it)."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray CLI is not installed")
    tmp = tmp_path_factory.mktemp("jobs-head")
    tokens = {name: generate_token() for name in ("team-a", "team-b", "root")}
    entries = [
        {"name": "team-a", "namespace": "team-a", "sha256": hash_token(tokens["team-a"])},
        {"name": "team-b", "namespace": "team-b", "sha256": hash_token(tokens["team-b"])},
        {
            "name": "root",
            "namespace": "default",
            "sha256": hash_token(tokens["root"]),
            "admin": True,
        },
    ]
    audit = tmp / "audit-ray.jsonl"

    def open_platform(app: dict[str, Any]) -> None:
        app["args"]["auth"] = {"mode": "disabled"}
        app["args"]["audit"] = {}

    def with_auth(app: dict[str, Any]) -> None:
        app["args"]["runtime"] = {"type": "local", "state_dir": str(tmp / "state-rayauth")}
        app["args"]["auth"] = {"tokens": entries}
        app["args"]["audit"] = {"path": str(audit)}

    namespace = "rock-e2e-jobs"
    with start_ray_head() as head:
        state_dir = deploy(head, tmp, namespace, open_platform, also={"/rayauth": with_auth})
        yield JobsHead(
            head=head,
            namespace=namespace,
            state_dir=state_dir,
            auth_namespace=f"{namespace}-rayauth",
            tokens=tokens,
            audit=audit,
        )
