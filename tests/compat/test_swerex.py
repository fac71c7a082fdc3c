"""SWE-ReX 1.4's own ``RemoteRuntime`` driving a platform sandbox through
``/v1/sandboxes/{id}/swerex`` (``RemoteRuntimeConfig(host=<that URL>, port=None,
auth_token=<platform token>)``), in .clients/swe-rex."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from .conftest import CompatPlatform, run_driver

#: The session platform (a Ray head and a deploy) starts inside the first test's budget.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def sandbox(compat: CompatPlatform) -> Iterator[str]:
    with compat.client("alice") as api:
        reply = api.post("/v1/sandboxes", json={"owner": "swerex-test"})
        assert reply.status_code == 201, reply.text
        sandbox_id = reply.json()["id"]
        yield sandbox_id
        api.delete(f"/v1/sandboxes/{sandbox_id}")


def test_remote_runtime_on_a_platform_sandbox(compat: CompatPlatform, sandbox: str) -> None:
    base = f"{compat.url}/v1/sandboxes/{sandbox}/swerex"
    out = run_driver("swe-rex", "swerex_remote.py", base, compat.tokens["alice"])
    assert out["is_alive"] is True
    assert out["session"] == "/tmp 7\n"
    assert "exit code 5" in out["nonzero"]
    assert out["timeout"] == "CommandTimeoutError"
    assert out["no_session"] == "SessionDoesNotExistError"
    assert out["execute"] == {"stdout": "out\n", "stderr": "err\n", "exit_code": 2}
    assert out["read"] == "a\nb\n"
    assert out["uploaded"] == "VALUE = 42\n"  # a directory: zipped by the client, unzipped here


def test_other_namespace_and_bad_token_in_swerex_dialect(
    compat: CompatPlatform, sandbox: str
) -> None:
    base = f"{compat.url}/v1/sandboxes/{sandbox}/swerex"
    # Bob (another namespace) gets SWE-ReX's 511, as for a sandbox that does not exist.
    reply = httpx.get(f"{base}/is_alive", headers={"X-API-Key": compat.tokens["bob"]})
    assert reply.status_code == 511
    error = reply.json()["swerexception"]
    assert error["class_path"] == "swerex.exceptions.SwerexException"
    assert "no sandbox" in error["message"] and error["traceback"] == ""
    unknown = f"{compat.url}/v1/sandboxes/sb-000000000000-0000000000000000/swerex/is_alive"
    reply = httpx.get(unknown, headers={"X-API-Key": compat.tokens["alice"]})
    assert reply.status_code == 511 and "swerexception" in reply.json()
    reply = httpx.get(f"{base}/is_alive", headers={"X-API-Key": "rk_wrong"})
    assert reply.status_code == 401 and "detail" in reply.json()
    reply = httpx.post(
        f"{base}/run_in_session",
        headers={"X-API-Key": compat.tokens["alice"]},
        json={"command": 42, "action_type": "bash"},
    )
    assert reply.status_code == 422 and "detail" in reply.json()
    out = run_driver("swe-rex", "swerex_remote.py", base, "rk_wrong")
    assert out["is_alive"] is False
