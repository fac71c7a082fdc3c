"""rl-rock 1.11.0's own ``Sandbox`` and ``SandboxGroup`` against ROCK's sandbox API on the platform.

The SDK runs unmodified in ``.clients/rl-rock`` (``drivers/rock_sdk.py``), authenticating with
ROCK's ``XRL-Authorization: Bearer`` header; this side checks what it got and that the
platform is left empty.
"""

from __future__ import annotations

import pytest

from .conftest import CompatPlatform, run_driver

#: The session platform (a Ray head and a deploy) starts inside the first test's budget.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

ROCK = "/apis/envs/sandbox/v1"


def _rock_sandboxes(compat: CompatPlatform) -> list[str]:
    with compat.client("alice") as api:
        items = api.get("/v1/sandboxes", params={"label": "rock-serve/api=rock"}).json()["items"]
    return [item["id"] for item in items]


def test_sandbox_lifecycle_commands_and_files(compat: CompatPlatform) -> None:
    out = run_driver("rl-rock", "rock_sdk.py", compat.url, compat.tokens["alice"], "sandbox")
    status = out["status"]
    assert status["sandbox_id"] == out["sandbox_id"] and status["is_alive"] is True
    assert status["state"] == "running" and status["namespace"] == "team-a"
    assert status["status"]["docker_run"]["status"] == "success"
    assert (status["user_id"], status["experiment_id"]) == ("driver", "exp-1")
    assert (status["cpus"], status["memory"]) == (1.0, "1024m")  # memory="1g" -> resources
    assert status["auto_stop_time"] is not None  # auto_clear_seconds -> the lease
    assert out["is_alive"] is True
    assert (out["echo"]["output"], out["echo"]["exit_code"]) == ("hello-42\n", 0)
    # A session keeps cwd and env (ROCK's env_enable) between calls.
    assert out["session"]["output"] == "/ 1 2\n"
    # check="raise" (the SDK's default): a non-zero exit is a Failed reply with code 6000.
    assert "exit code 3" in out["failed_raise"] and "6000" in out["failed_raise"]
    # arun(mode="nohup"): nohup + `kill -0` polling until the process is gone, then cat.
    assert (out["nohup"]["output"], out["nohup"]["exit_code"]) == ("nohup-done\n", 0)
    assert out["execute"] == {"stdout": "out\n", "stderr": "err\n", "exit_code": 3}
    assert out["execute_str"]["stdout"] == "42\n"
    assert out["write"]["success"] is True
    assert out["read"]["content"] == "line1\nline2\n"
    assert out["upload"]["success"] is True and out["uploaded_size"] == "2560"
    assert out["close_session"] == {"session_type": "bash"}
    assert "4000" in out["after_stop"] and "sandbox_not_found" in out["after_stop"]
    assert out["sandbox_id"] not in _rock_sandboxes(compat)


def test_sandbox_group_starts_every_member(compat: CompatPlatform) -> None:
    out = run_driver("rl-rock", "rock_sdk.py", compat.url, compat.tokens["alice"], "group4")
    assert len(set(out["ids"])) == 4
    assert out["outputs"] == [f"member-{i}\n" for i in range(4)]
    assert not set(out["ids"]) & set(_rock_sandboxes(compat))


def test_without_a_token_the_sdk_is_refused(compat: CompatPlatform) -> None:
    out = run_driver("rl-rock", "rock_sdk.py", compat.url, "-", "unauthorized")
    assert "started" not in out
    assert "401" in out["error"]
