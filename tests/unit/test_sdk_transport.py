"""The SDK's transport seam: data-plane calls go to the sandbox's node, the rest to the Admin."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import httpx
import pytest

from rock_serve.errors import NotFound
from rock_serve.sdk import Client, RetryPolicy
from rock_serve.sdk._base import ClientSettings
from rock_serve.sdk._sync_transport import AdminTransport, DirectTransport

ROOT = Path(__file__).resolve().parents[2]
SID = "sb-node1-01hzzzzzzzzzzzzzzzzzzzzzzz"
NODE = "http://10.9.8.7:4567"
RESULT = {"session": "default", "output": "hi\n", "exit_code": 0, "duration": 0.001}


class Admin:
    """A fake Admin answering grants (and data-plane calls, for the fallback)."""

    def __init__(self, grant_status: int = 200) -> None:
        self.grant_status = grant_status
        self.seen: list[tuple[str, str, str | None]] = []
        self.grants = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path, request.headers.get("authorization")))
        if request.url.path.endswith("/dataplane"):
            self.grants += 1
            if self.grant_status != 200:
                body = {"error": {"code": "not_found", "message": "no data plane"}}
                return httpx.Response(self.grant_status, json=body)
            grant = {
                "sandbox_id": SID,
                "endpoint": NODE,
                "token": f"rdp1.grant{self.grants}.sig",
                "expires_at": time.time() + 600,
            }
            return httpx.Response(200, json=grant)
        if request.url.path.endswith("/run"):
            return httpx.Response(200, json={**RESULT, "output": "admin\n"})
        return httpx.Response(204)


def _client(admin: Admin, node: httpx.MockTransport, mode: str = "auto") -> Client:
    settings = ClientSettings(base_url="http://127.0.0.1:8000", token="platform-token")
    admin_transport = AdminTransport(settings, transport=httpx.MockTransport(admin))
    direct = DirectTransport(admin_transport, mode=mode, transport=node)  # type: ignore[arg-type]
    once = RetryPolicy(max_attempts=1)
    return Client("http://127.0.0.1:8000", token="platform-token", transport=direct, retry=once)


def test_data_plane_calls_go_to_the_node_with_the_sandbox_token():
    node_seen: list[tuple[str, str | None, str | None]] = []

    def node(request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization")
        node_seen.append((str(request.url), auth, request.headers.get("idempotency-key")))
        return httpx.Response(200, json=RESULT)

    admin = Admin()
    with _client(admin, httpx.MockTransport(node)) as client:
        for _ in range(3):
            assert client.run(SID, "echo hi").output == "hi\n"
        client.delete_sandbox(SID)
        transport = client._transport
        assert isinstance(transport, DirectTransport)
        assert transport.direct_calls == 3 and transport.fallbacks == 0
        assert SID not in transport._grants  # forgotten with the sandbox
    assert admin.grants == 1  # one grant, reused while valid
    assert [u for u, _, _ in node_seen] == [f"{NODE}/v1/sandboxes/{SID}/sessions/default/run"] * 3
    assert all(a == "Bearer rdp1.grant1.sig" and key for _, a, key in node_seen)
    # The platform token goes to the Admin only; the sandbox token to the node only.
    assert all(a == "Bearer platform-token" for _, _, a in admin.seen)
    assert ("DELETE", f"/v1/sandboxes/{SID}", "Bearer platform-token") in admin.seen


def test_an_unreachable_node_falls_back_to_the_admin_and_is_left_alone():
    calls = []

    def node(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    admin = Admin()
    with _client(admin, httpx.MockTransport(node)) as client:
        assert client.run(SID, "echo hi").output == "admin\n"
        assert client.run(SID, "echo hi").output == "admin\n"
        transport = client._transport
        assert isinstance(transport, DirectTransport)
        assert transport.fallbacks == 2 and transport.direct_calls == 0
    assert len(calls) == 1  # the second call did not try the dead node again
    with _client(Admin(), httpx.MockTransport(node), mode="direct") as client:
        with pytest.raises(httpx.ConnectError):
            client.run(SID, "echo hi")


def test_no_grant_means_the_admin_path_and_direct_mode_raises_the_error():
    admin = Admin(grant_status=404)
    with _client(admin, httpx.MockTransport(lambda r: httpx.Response(500))) as client:
        assert client.run(SID, "echo hi").output == "admin\n"
        assert client.run(SID, "echo hi").output == "admin\n"
    assert admin.grants == 1  # a refused grant is not asked again at once
    failing = httpx.MockTransport(lambda r: httpx.Response(500))
    with _client(Admin(grant_status=404), failing, mode="direct") as c:
        with pytest.raises(NotFound):
            c.run(SID, "echo hi")


def test_a_refused_token_is_granted_again_once():
    tokens = []

    def node(request: httpx.Request) -> httpx.Response:
        tokens.append(request.headers["authorization"])
        if len(tokens) == 1:
            body = {"error": {"code": "unauthorized", "message": "expired"}}
            return httpx.Response(401, json=body)
        return httpx.Response(200, json=RESULT)

    admin = Admin()
    with _client(admin, httpx.MockTransport(node)) as client:
        assert client.run(SID, "echo hi").output == "hi\n"
    assert tokens == ["Bearer rdp1.grant1.sig", "Bearer rdp1.grant2.sig"]


def test_an_httpx_transport_keeps_every_call_on_the_admin_path():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json=RESULT)

    with Client("http://rock.test", transport=httpx.MockTransport(handler)) as client:
        client.run(SID, "echo hi")
        assert isinstance(client._transport, AdminTransport)
    assert seen == [f"/v1/sandboxes/{SID}/sessions/default/run"]


def test_the_sdk_imports_nothing_of_the_server():
    for path in (ROOT / "sdk").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith("rock_serve.deployments"), (path, name)
                assert name.split(".")[0] != "ray", (path, name)


def test_an_operation_the_node_does_not_serve_goes_to_the_admin():
    def node(request: httpx.Request) -> httpx.Response:
        error = {"code": "not_found", "message": "no route", "details": {"dataplane": "no_route"}}
        return httpx.Response(404, json={"error": error})

    admin = Admin()
    with _client(admin, httpx.MockTransport(node)) as client:
        assert client.run(SID, "echo hi").output == "admin\n"
    assert ("POST", f"/v1/sandboxes/{SID}/sessions/default/run", "Bearer platform-token") in (
        admin.seen
    )
