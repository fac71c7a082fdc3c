"""ROCK's sandbox API and the auth carriers, over plain HTTP: bad input answers in ROCK's
dialect (envelope ``Failed`` with ROCK's codes, HTTP 200 as ROCK does; 401 only for a refused
credential), namespaces hold, and tokens sent in URLs never reach the logs."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import MAX_FILE_BYTES, CompatPlatform

#: The session platform (a Ray head and a deploy) starts inside the first test's budget.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

ROCK = "/apis/envs/sandbox/v1"
UNKNOWN = "sb-000000000000-0000000000000000"


def _failed(reply: httpx.Response, code: int, status: int = 200) -> str:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"status", "message", "error", "result"}, body
    assert body["status"] == "Failed" and body["result"]["code"] == code, body
    return str(body["error"])


@pytest.fixture
def rock_sandbox(compat: CompatPlatform) -> Iterator[str]:
    with compat.client("alice") as api:
        reply = api.post(f"{ROCK}/start_async", json={"image": "python:3.11", "memory": "512m"})
        assert reply.json()["status"] == "Success", reply.text
        sandbox_id = reply.json()["result"]["sandbox_id"]
        yield sandbox_id
        api.post(f"{ROCK}/delete", json={"sandbox_id": sandbox_id})


def test_bad_input_is_rock_failed_never_our_error_body(
    compat: CompatPlatform, rock_sandbox: str
) -> None:
    with compat.client("alice") as api:
        # Unknown and malformed ids.
        assert "sandbox_not_found" in _failed(
            api.get(f"{ROCK}/get_status", params={"sandbox_id": UNKNOWN}), 4000
        )
        _failed(api.post(f"{ROCK}/execute", json={"sandbox_id": "nope", "command": "ls"}), 4000)
        alive = api.get(f"{ROCK}/is_alive", params={"sandbox_id": UNKNOWN}).json()
        assert alive["status"] == "Success" and alive["result"]["is_alive"] is False
        # Invalid bodies (ROCK's validation handler: "invalid parameter", HTTP 200).
        reply = api.post(f"{ROCK}/run_in_session", json={"sandbox_id": rock_sandbox})
        assert "command" in _failed(reply, 4000)
        assert reply.json()["message"] == "invalid parameter"
        _failed(api.post(f"{ROCK}/start_async", json={"image": "x", "memory": "lots"}), 4000)
        _failed(
            api.post(
                f"{ROCK}/stop", content=b"{not json", headers={"content-type": "application/json"}
            ),
            4000,
        )
        # Unknown session, unreadable file, unsupported remote_user.
        body = {"sandbox_id": rock_sandbox, "command": "true", "session": "missing"}
        assert "session" in _failed(api.post(f"{ROCK}/run_in_session", json=body), 4000)
        body = {"sandbox_id": rock_sandbox, "path": "no/such/file"}
        _failed(api.post(f"{ROCK}/read_file", json=body), 4000)
        body = {"sandbox_id": rock_sandbox, "session": "s", "remote_user": "admin"}
        _failed(api.post(f"{ROCK}/create_session", json=body), 4000)
        # A failing command with check=True is a command error (6000).
        body = {"sandbox_id": rock_sandbox, "command": ["false"], "check": True}
        _failed(api.post(f"{ROCK}/execute", json=body), 6000)
        # Malformed multipart, a missing field, and an upload over max_file_bytes.
        headers = {"content-type": "multipart/form-data; boundary=xyz"}
        _failed(api.post(f"{ROCK}/upload", content=b"--xyz\r\ngarbage", headers=headers), 4000)
        files = {"file": ("a.txt", b"data", "text/plain")}
        reply = api.post(f"{ROCK}/upload", data={"sandbox_id": rock_sandbox}, files=files)
        assert "target_path" in _failed(reply, 4000)
        reply = api.post(
            f"{ROCK}/upload",
            data={"sandbox_id": rock_sandbox, "target_path": "big.bin"},
            files={"file": ("big.bin", b"x" * (MAX_FILE_BYTES + 1), "application/octet-stream")},
        )
        assert "limit" in _failed(reply, 4000)
        body = {
            "sandbox_id": rock_sandbox,
            "path": "big.txt",
            "content": "x" * (MAX_FILE_BYTES + 1),
        }
        assert "limit" in _failed(api.post(f"{ROCK}/write_file", json=body), 4000)
        # Success stays ROCK's: the upload lands.
        reply = api.post(
            f"{ROCK}/upload",
            data={"sandbox_id": rock_sandbox, "target_path": "up/a.txt"},
            files=files,
        )
        assert reply.json()["status"] == "Success", reply.text
        body = {"sandbox_id": rock_sandbox, "path": "up/a.txt"}
        assert api.post(f"{ROCK}/read_file", json=body).json()["result"]["content"] == "data"
        # /get_token answers without OSS settings, so the SDK never tries OSS.
        token = api.get(f"{ROCK}/get_token", params={"account": "primary"}).json()
        assert token["status"] == "Success" and "Bucket" not in token["result"]


def test_other_namespace_sees_nothing(compat: CompatPlatform, rock_sandbox: str) -> None:
    with compat.client("bob") as bob:
        for reply in (
            bob.get(f"{ROCK}/get_status", params={"sandbox_id": rock_sandbox}),
            bob.post(f"{ROCK}/execute", json={"sandbox_id": rock_sandbox, "command": "id"}),
            bob.post(f"{ROCK}/stop", json={"sandbox_id": rock_sandbox}),
        ):
            assert "sandbox_not_found" in _failed(reply, 4000)
    with compat.client("alice") as api:
        status = api.get(f"{ROCK}/get_status", params={"sandbox_id": rock_sandbox}).json()
        assert status["result"]["is_alive"] is True  # bob's stop did nothing


def test_refused_credentials_are_401_in_the_envelope(compat: CompatPlatform) -> None:
    reply = httpx.get(f"{compat.url}{ROCK}/get_status", params={"sandbox_id": UNKNOWN})
    _failed(reply, 4000, status=401)
    reply = httpx.get(
        f"{compat.url}{ROCK}/get_status",
        params={"sandbox_id": UNKNOWN},
        headers={"X-Key": "rk_wrong"},
    )
    _failed(reply, 4000, status=401)


@pytest.mark.parametrize("carrier", ["bearer", "x-key", "xrl", "basic", "basic-user", "x-api-key"])
def test_every_carrier_authenticates(compat: CompatPlatform, carrier: str) -> None:
    token = compat.tokens["bob"]
    headers = {
        "bearer": {"Authorization": f"Bearer {token}"},
        "x-key": {"X-Key": token},
        "xrl": {"XRL-Authorization": f"Bearer {token}"},
        "basic": {"Authorization": "Basic " + base64.b64encode(f"u:{token}".encode()).decode()},
        "basic-user": {"Authorization": "Basic " + base64.b64encode(f"{token}:".encode()).decode()},
        "x-api-key": {"X-API-Key": token},
    }[carrier]
    reply = httpx.get(f"{compat.url}/v1/sandboxes", headers=headers)
    assert reply.status_code == 200, reply.text
    assert httpx.get(f"{compat.url}/v1/sandboxes").status_code == 401


def test_query_token_only_where_documented_and_never_logged(compat: CompatPlatform) -> None:
    token = compat.tokens["alice"]
    body = {"code": "print(1)", "language": "python"}
    reply = httpx.post(f"{compat.url}/run_code", params={"token": token}, json=body, timeout=60)
    assert reply.status_code == 200 and reply.json()["status"] == "Success", reply.text
    # Other routes do not take a token from the URL.
    assert httpx.get(f"{compat.url}/v1/sandboxes", params={"token": token}).status_code == 401
    schema = httpx.get(f"{compat.url}/openapi.json").json()
    params = schema["paths"]["/run_code"]["post"]["parameters"]
    assert any(p["name"] == "token" and p["in"] == "query" for p in params)
    # A wrong token in the URL is refused and audited, without the token.
    reply = httpx.post(f"{compat.url}/run_code", params={"token": "rk_wrongsecret"}, json=body)
    assert reply.status_code == 401
    logs = [
        compat.audit,
        *Path(compat.head.temp).rglob("*.log"),
        *Path(compat.head.temp).rglob("*.out"),
        *Path(compat.head.temp).rglob("*.err"),
    ]
    seen = [
        str(path)
        for path in logs
        if path.is_file()
        and (token.encode() in path.read_bytes() or b"rk_wrongsecret" in path.read_bytes())
    ]
    assert seen == []
    assert compat.audit.is_file() and b"/run_code" in compat.audit.read_bytes()
