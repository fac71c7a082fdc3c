"""ROCK's GEM env API (``/apis/v1/envs/gem/*``) on the real platform, and our GEM client of it.

Requests are the exact bodies ROCK's ``RockEnv`` sends (``{"env_id"}``, ``{"sandbox_id",
"seed"}``, ``{"sandbox_id", "action"}``...), and replies are checked key for key. Instances live
in the platform's env table actor (``rock-envs``), so they survive any Admin replica: one test
runs an app with two Admin replicas. Namespaces come from the token-auth app of test_auth.py.
The session's platform allows 4 sandboxes per node: no test holds more.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from rock_serve.config import GemConfig
from rock_serve.deployments._gem import ENV_TABLE_NAME
from rock_serve.envs.integrations import GemEnvClient, gem_make
from rock_serve.errors import Conflict, InvalidRequest, NotFound
from tests._wait import wait_until

from .conftest import Platform, _wait_healthy
from .test_auth import AuthApp, deploy_auth_app, remove_auth_app

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "gem_client.py"
EXPECTED = "reward=1.0 after"

GEM = "/apis/v1/envs/gem"
NAMESPACE = "rock-e2e"
GEM_LABEL = {"label": "rock-serve/integration=gem-api"}


def _post(api: httpx.Client, route: str, body: dict[str, Any], status: int = 200) -> Any:
    reply = api.post(f"{GEM}/{route}", json=body)
    assert reply.status_code == status, reply.text
    return reply.json()


def _error(api: httpx.Client, route: str, body: dict[str, Any], status: int) -> dict[str, Any]:
    error = _post(api, route, body, status)["error"]
    assert set(error) <= {"code", "message", "details", "retry_after"}, error
    return dict(error)


def _gem_sandboxes(api: httpx.Client) -> list[str]:
    return [i["id"] for i in api.get("/v1/sandboxes", params=GEM_LABEL).json()["items"]]


def _table(namespace: str = NAMESPACE) -> Any:
    import ray

    return ray.get_actor(ENV_TABLE_NAME, namespace=namespace)


def _instances(namespace: str = NAMESPACE) -> dict[str, int]:
    import ray

    counts: dict[str, int] = ray.get(_table(namespace).instances.remote())
    return counts


def _binary_search(play) -> tuple[int, float, bool]:
    """Play GuessNumber (1..100) with ``play(action) -> step reply``; (steps, reward, done)."""
    low, high, steps = 1, 100, 0
    while True:
        guess = (low + high) // 2
        reply = play(str(guess))
        steps += 1
        if reply["terminated"] or reply["truncated"]:
            return steps, reply["reward"], reply["terminated"]
        if "higher" in reply["observation"]:
            low = guess + 1
        else:
            high = guess - 1


# ---------------------------------------------------------------------------------------------
# ROCK's payloads, over plain HTTP


def test_rock_client_flow(api):
    listed = _post(api, "list", {"sandbox_id": None})
    assert set(listed) == {"env_id"}
    assert {"rock/GuessNumber-v0", "rock/Terminal-v0", "rock/CodeExec-v0"} <= set(listed["env_id"])

    made = _post(api, "make", {"env_id": "rock/GuessNumber-v0"})
    assert list(made) == ["sandbox_id"]
    iid = made["sandbox_id"]
    assert _gem_sandboxes(api) == []  # the sandbox comes with the first reset

    reset = _post(api, "reset", {"sandbox_id": iid, "seed": 8})
    assert set(reset) == {"observation", "info"}
    assert "between 1 and 100" in reset["observation"] and reset["info"]["high"] == 100
    (sandbox,) = _gem_sandboxes(api)
    record = api.get(f"/v1/sandboxes/{sandbox}").json()
    assert record["namespace"] == "default" and record["lease_seconds"] is not None

    def play(action: str) -> dict[str, Any]:
        reply = _post(api, "step", {"sandbox_id": iid, "action": action})
        assert set(reply) == {"observation", "reward", "terminated", "truncated", "info"}
        assert isinstance(reply["reward"], float)
        return reply

    steps, reward, terminated = _binary_search(play)
    assert (reward, terminated) == (1.0, True) and steps <= 7

    # After the end: 409 with the one error body; a reset with the same seed replays the task.
    error = _error(api, "step", {"sandbox_id": iid, "action": "50"}, 409)
    assert error["code"] == "conflict" and "reset" in error["message"]
    _post(api, "reset", {"sandbox_id": iid, "seed": 8})
    assert _binary_search(play)[0] == steps
    assert _gem_sandboxes(api) == [sandbox]  # later episodes reuse the sandbox

    assert _post(api, "close", {"sandbox_id": iid}) == {"sandbox_id": iid}
    assert _gem_sandboxes(api) == []
    assert _error(api, "step", {"sandbox_id": iid, "action": "1"}, 404)["code"] == "not_found"
    assert _error(api, "close", {"sandbox_id": iid}, 404)["code"] == "not_found"


def test_bad_input(api):
    error = _error(api, "make", {"env_id": "rock/GuessNumber-v9"}, 404)
    assert error["code"] == "not_found" and "rock/GuessNumber-v0" in error["message"]
    assert error["details"]["suggestions"] == ["rock/GuessNumber-v0"]
    error = _error(api, "make", {"env_id": "rock/GuessNumber-v0", "kwargs": {"hihg": 5}}, 400)
    assert error["code"] == "invalid_request" and "'high'" in error["message"]
    bad_value = {"env_id": "rock/GuessNumber-v0", "kwargs": {"high": -1}}
    assert _error(api, "make", bad_value, 400)["code"] == "invalid_request"
    client_kwarg = {"env_id": "rock/GuessNumber-v0", "kwargs": {"client": "x"}}
    assert _error(api, "make", client_kwarg, 400)["code"] == "invalid_request"
    assert _error(api, "make", {}, 400)["code"] == "invalid_request"

    iid = _post(api, "make", {"env_id": "rock/GuessNumber-v0"})["sandbox_id"]
    try:
        error = _error(api, "step", {"sandbox_id": iid, "action": "50"}, 409)
        assert error["code"] == "conflict" and "reset" in error["message"]
        assert _error(api, "reset", {"sandbox_id": iid, "seed": -1}, 400)
        assert _error(api, "step", {"sandbox_id": iid}, 400)["code"] == "invalid_request"
        _post(api, "reset", {"sandbox_id": iid, "seed": 1})
        # An action outside the action space (a text env given a number): 400, and the episode
        # goes on.
        assert _error(api, "step", {"sandbox_id": iid, "action": 7}, 400)["code"] == (
            "invalid_request"
        )
        assert _post(api, "step", {"sandbox_id": iid, "action": "50"})["terminated"] in (
            True,
            False,
        )
    finally:
        _post(api, "close", {"sandbox_id": iid})
    for route in ("reset", "step", "close"):
        body = {"sandbox_id": "gem-nope", "action": "1"}
        assert _error(api, route, body, 404)["code"] == "not_found"
    assert _error(api, "list", {"sandbox_id": "gem-nope"}, 404)["code"] == "not_found"
    assert _gem_sandboxes(api) == []


def test_kwargs_reach_the_env(api):
    body = {"env_id": "rock/GuessNumber-v0", "kwargs": {"high": 3, "state": "memory"}}
    iid = _post(api, "make", body)["sandbox_id"]
    reset = _post(api, "reset", {"sandbox_id": iid, "seed": 2})
    assert "between 1 and 3" in reset["observation"]
    assert _gem_sandboxes(api) == []  # state="memory" never makes a sandbox
    rewards = [_post(api, "step", {"sandbox_id": iid, "action": str(g)})["reward"] for g in (2,)]
    assert rewards[0] in (0.0, 1.0)
    _post(api, "close", {"sandbox_id": iid})


def test_terminal_env_with_options_and_sandbox_kwargs(api):
    body = {
        "env_id": "rock/Terminal-v0",
        "kwargs": {
            "family": "count_lines",
            "max_episode_steps": 3,
            "sandbox": {"labels": {"x": "y"}},
        },
    }
    iid = _post(api, "make", body)["sandbox_id"]
    try:
        reset = _post(api, "reset", {"sandbox_id": iid, "seed": 21})
        assert reset["info"]["family"] == "count_lines" and "submit" in reset["observation"]
        (sandbox,) = _gem_sandboxes(api)
        assert api.get(f"/v1/sandboxes/{sandbox}").json()["labels"]["x"] == "y"
        first = _post(api, "step", {"sandbox_id": iid, "action": "ls"})
        assert first["info"]["exit_code"] == 0 and not first["truncated"]
        _post(api, "step", {"sandbox_id": iid, "action": "exit 3"})  # the shell ends: no harm
        last = _post(api, "step", {"sandbox_id": iid, "action": "echo still here"})
        assert "still here" in last["observation"] and last["truncated"] is True
    finally:
        _post(api, "close", {"sandbox_id": iid})
    assert _gem_sandboxes(api) == []


def test_concurrent_instances(api, platform):
    def episode(seed: int) -> tuple[int, float]:
        with platform.client() as client:
            iid = _post(client, "make", {"env_id": "rock/GuessNumber-v0"})["sandbox_id"]
            try:
                _post(client, "reset", {"sandbox_id": iid, "seed": seed})
                steps, reward, _ = _binary_search(
                    lambda a: _post(client, "step", {"sandbox_id": iid, "action": a})
                )
                return steps, reward
            finally:
                _post(client, "close", {"sandbox_id": iid})

    with ThreadPoolExecutor(3) as pool:  # within the platform's capacity of 4 sandboxes
        results = list(pool.map(episode, range(6)))
    assert [reward for _, reward in results] == [1.0] * 6
    assert _gem_sandboxes(api) == []
    assert _instances().get("default", 0) == 0


def test_idle_instances_are_reaped(api):
    import ray

    iid = _post(api, "make", {"env_id": "rock/GuessNumber-v0"})["sandbox_id"]
    table = _table()  # made by the first GEM call: look it up after one (the test runs alone too)
    _post(api, "reset", {"sandbox_id": iid, "seed": 3})
    assert len(_gem_sandboxes(api)) == 1
    ray.get(table.configure.remote(idle_ttl_seconds=1.0, reap_interval_seconds=0.2))
    try:
        # ``list`` naming the instance checks it exists without using it (no renewal).
        wait_until(
            lambda: api.post(f"{GEM}/list", json={"sandbox_id": iid}).status_code == 404,
            what="the idle instance to be reaped",
        )
        # The instance leaves the table before its sandbox is deleted: wait for that too.
        wait_until(lambda: _gem_sandboxes(api) == [], what="the reaped instance's sandbox to go")
    finally:
        ray.get(table.configure.remote(GemConfig()))


# ---------------------------------------------------------------------------------------------
# The GEM client


def test_gem_env_client(api, platform):
    with GemEnvClient("rock/GuessNumber-v0", base_url=platform.url) as env:
        assert env.unwrapped is env and env.instance_id and env.instance_id.startswith("gem-")
        assert "rock/Terminal-v0" in env.list_envs()
        with pytest.raises(Conflict):
            env.step("50")
        obs, info = env.reset(seed=8)
        assert "between 1 and 100" in obs and info["high"] == 100
        steps, reward, terminated = _binary_search(
            lambda a: dict(
                zip(
                    ("observation", "reward", "terminated", "truncated", "info"),
                    env.step(a),
                    strict=True,
                )
            )
        )
        assert (reward, terminated) == (1.0, True)
        with pytest.raises(Conflict):
            env.step("50")
        env.reset(seed=9)
        with pytest.raises(InvalidRequest):
            env.step(12)  # not text
        with pytest.raises(NotImplementedError):
            env.sample_random_action()
        twin = env.spawn(high=3)
        try:
            assert twin.instance_id != env.instance_id
            assert "between 1 and 3" in twin.reset(seed=1)[0]
        finally:
            twin.close()
        assert len(_gem_sandboxes(api)) == 1  # the twin's is gone already
    assert _gem_sandboxes(api) == []
    env.close()  # idempotent
    with pytest.raises(InvalidRequest):
        env.reset()

    # ROCK's rock.make, with keyword arguments reaching the env (ROCK's raises TypeError).
    with gem_make("rock/GuessNumber-v0", base_url=platform.url, high=4, state="memory") as env:
        assert "between 1 and 4" in env.reset(seed=0)[0]
    with pytest.raises(NotFound):
        GemEnvClient("rock/Nope-v0", base_url=platform.url)
    with pytest.raises(InvalidRequest):
        gem_make("rock/GuessNumber-v0", base_url=platform.url, nope=1)
    assert _instances().get("default", 0) == 0


def test_client_of_a_reaped_instance_closes_quietly(api, platform):
    env = GemEnvClient("rock/GuessNumber-v0", base_url=platform.url, kwargs={"state": "memory"})
    _post(api, "close", {"sandbox_id": env.instance_id})  # closed behind its back
    with pytest.raises(NotFound):
        env.reset()
    env.close()


# ---------------------------------------------------------------------------------------------
# Several Admin replicas, and namespaces


@pytest.fixture(scope="module")
def two_replicas(platform: Platform) -> Any:
    """The platform's app again (same Ray namespace) with two Admin replicas, under /gem2."""
    from ray import serve

    from rock_serve.deployments.admin import Admin

    args = {
        "runtime": {"type": "local", "state_dir": str(platform.state_dir)},
        "namespace": NAMESPACE,
        "max_sandboxes_per_node": 4,
        "default_ttl_seconds": 600,
        "max_ttl_seconds": 3600,
        "reap_interval_seconds": 0.2,
    }
    admin: Any = Admin
    serve.run(admin.options(num_replicas=2).bind(args), name="gem2", route_prefix="/gem2")
    url = f"{platform.url}/gem2"
    _wait_healthy(url, time.monotonic() + 60)
    yield url
    serve.delete("gem2")


def test_instances_outlive_any_one_admin_replica(api, two_replicas):
    # A fresh connection per call: the proxy spreads calls over both replicas; the instance
    # lives in the env table actor, so any replica serves any call.
    def post(route: str, body: dict[str, Any]) -> Any:
        with httpx.Client(base_url=two_replicas, timeout=60) as client:
            return _post(client, route, body)

    iid = post("make", {"env_id": "rock/GuessNumber-v0"})["sandbox_id"]
    post("reset", {"sandbox_id": iid, "seed": 8})
    steps, reward, _ = _binary_search(lambda a: post("step", {"sandbox_id": iid, "action": a}))
    assert reward == 1.0
    for _ in range(10):
        post("reset", {"sandbox_id": iid, "seed": 8})
    post("close", {"sandbox_id": iid})
    assert _gem_sandboxes(api) == []


@pytest.fixture(scope="module")
def auth_app(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Any:
    app = deploy_auth_app(platform, "gemauth", tmp_path_factory.mktemp("gemauth"))
    yield app
    remove_auth_app(app, "gemauth")


def test_instances_belong_to_their_namespace(auth_app: AuthApp):
    with (
        auth_app.client("alice") as alice,
        auth_app.client("bob") as bob,
        auth_app.client("root") as root,
        auth_app.client(None) as nobody,
    ):
        assert nobody.post(f"{GEM}/make", json={"env_id": "rock/GuessNumber-v0"}).status_code == (
            401
        )
        iid = _post(alice, "make", {"env_id": "rock/GuessNumber-v0"})["sandbox_id"]
        _post(alice, "reset", {"sandbox_id": iid, "seed": 5})
        # Another namespace sees no such instance (404, as an unknown one); an admin does.
        for route in ("reset", "step", "close"):
            body = {"sandbox_id": iid, "action": "50"}
            assert _error(bob, route, body, 404)["code"] == "not_found"
        assert _error(bob, "list", {"sandbox_id": iid}, 404)["code"] == "not_found"
        assert _post(root, "step", {"sandbox_id": iid, "action": "50"})["reward"] in (0.0, 1.0)
        # Its sandbox is alice's namespace's, counted and listed there.
        (sandbox,) = _gem_sandboxes(alice)
        assert alice.get(f"/v1/sandboxes/{sandbox}").json()["namespace"] == "team-a"
        assert _gem_sandboxes(bob) == []
        assert _instances("rock-e2e-auth") == {"team-a": 1}
        _post(alice, "close", {"sandbox_id": iid})
        assert _gem_sandboxes(root) == []


def _all_sandboxes(api: httpx.Client) -> list[str]:
    return [i["id"] for i in api.get("/v1/sandboxes").json()["items"]]


def test_example_runs(api, platform):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROCK_")}
    env["ROCK_BASE_URL"] = platform.url
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / EXAMPLE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert EXPECTED in result.stdout, result.stdout[-3000:]
    assert _all_sandboxes(api) == []
