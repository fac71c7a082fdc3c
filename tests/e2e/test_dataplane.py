"""The direct data plane end to end: a real Serve app on loopback with tokens and an audit log.

Deployed under ``/dataplane`` in its own Ray namespace (so its own Scheduler, Worker and
data-plane server), sandboxes on the local runtime. The SDK reaches the sandbox's node
directly with a grant from the Admin; the node checks the sandbox-scoped token itself
(forged, expired, another sandbox's, none) and audits; a node that cannot be reached leaves
the SDK on the Admin path.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rock_serve import dataplane_token
from rock_serve.auth import generate_token, hash_token
from rock_serve.protocol.dataplane import DataPlaneGrant
from rock_serve.sdk import Client, RetryPolicy
from rock_serve.sdk._sync_transport import DirectTransport

from .conftest import Platform, _wait_healthy, delete_app

pytestmark = pytest.mark.ray

NAMESPACE = "rock-e2e-dataplane"
USERS = {"alice": "team-a", "bob": "team-b"}


class App:
    def __init__(self, url: str, tokens: dict[str, str], audit: Path) -> None:
        self.url, self.tokens, self.audit = url, tokens, audit

    def http(self, user: str) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def sdk(self, user: str, mode: str = "auto") -> Client:
        once = RetryPolicy(max_attempts=1)  # a dead node is not waited for
        return Client(self.url, token=self.tokens[user], dataplane=mode, retry=once)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def app(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    from ray import serve

    from rock_serve.deployments.app import build_app

    tmp = tmp_path_factory.mktemp("dataplane")
    tokens = {user: generate_token() for user in USERS}
    audit = tmp / "audit.jsonl"
    args = {
        "runtime": {"type": "local", "state_dir": str(tmp / "state")},
        "namespace": NAMESPACE,
        "default_ttl_seconds": 600,
        "auth": {
            "tokens": [
                {"name": u, "namespace": ns, "sha256": hash_token(tokens[u])}
                for u, ns in USERS.items()
            ]
        },
        "audit": {"path": str(audit)},
    }
    serve.run(build_app(args), name="dataplane", route_prefix="/dataplane")
    url = f"{platform.url}/dataplane"
    _wait_healthy(url, time.monotonic() + 60)
    yield App(url, tokens, audit)
    for user in USERS:
        with App(url, tokens, audit).http(user) as client:
            for item in client.get("/v1/sandboxes").json().get("items", []):
                client.delete(f"/v1/sandboxes/{item['id']}")
    delete_app("dataplane", NAMESPACE)


def _create(client: httpx.Client) -> str:
    resp = client.post("/v1/sandboxes", json={"ttl_seconds": 300})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _grant(client: httpx.Client, sandbox_id: str) -> DataPlaneGrant:
    resp = client.post(f"/v1/sandboxes/{sandbox_id}/dataplane")
    assert resp.status_code == 200, resp.text
    return DataPlaneGrant.model_validate(resp.json())


def _error(resp: httpx.Response) -> tuple[int, str]:
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return resp.status_code, str(body["error"]["code"])


def _audit_events(path: Path, predicate: Any, what: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists():
            events = [json.loads(line) for line in path.read_text().splitlines() if line]
            found = [e for e in events if predicate(e)]
            if found:
                return found
        time.sleep(0.1)
    raise AssertionError(f"no audit event: {what}")


def test_the_sdk_goes_straight_to_the_node_and_is_audited(app: App) -> None:
    with app.sdk("alice", "direct") as client, client.sandbox(ttl_seconds=300) as sb:
        sb.files.write("work/hello.txt", "hi there")
        assert sb.run("cd work && export X=42").exit_code == 0
        result = sb.run("echo $X $PWD")
        assert result.output.strip().split()[0] == "42"
        assert result.output.strip().endswith("/work")
        assert sb.files.read_text("work/hello.txt") == "hi there"
        assert sb.exec("cat work/hello.txt").stdout == "hi there"
        streamed = list(sb.stream_exec("echo one; echo two"))
        assert streamed[-1].exit_code == 0  # type: ignore[union-attr]
        assert sb.stats().pids_current >= 1
        transport = client._transport
        assert isinstance(transport, DirectTransport)
        assert transport.direct_calls >= 7 and transport.fallbacks == 0
        sid = sb.id
    grant = transport._grants.get(sid)
    assert grant is None  # forgotten with the sandbox
    events = _audit_events(
        app.audit,
        lambda e: (
            e["sandbox_id"] == sid
            and e["action"] == "file.write"
            and e["detail"].get("transport") == "direct"
        ),
        "the direct file write",
    )
    assert events[0]["token_name"] == "alice" and events[0]["namespace"] == "team-a"
    assert events[0]["code"] == "ok" and events[0]["path"] == "work/hello.txt"
    runs = _audit_events(
        app.audit,
        lambda e: e["sandbox_id"] == sid and e["action"] == "session.run",
        "the direct session runs",
    )
    assert any(e["command"] == "echo $X $PWD" for e in runs)
    assert all(e["detail"]["transport"] == "direct" for e in runs)


def test_the_node_checks_the_sandbox_token(app: App) -> None:
    import ray

    with app.http("alice") as alice, app.http("bob") as bob:
        mine, theirs = _create(alice), _create(bob)
        grant = _grant(alice, mine)
        # The record names the node's data plane; the grant adds the token.
        assert alice.get(f"/v1/sandboxes/{mine}").json()["endpoint"] == grant.endpoint
        assert grant.endpoint.startswith("http://127.0.0.1:")  # dataplane.host's default
        exec_body = {"command": "echo ok"}
        with httpx.Client(base_url=grant.endpoint, timeout=30) as node:

            def run(token: str | None, sandbox_id: str = mine) -> httpx.Response:
                headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
                return node.post(
                    f"/v1/sandboxes/{sandbox_id}/exec", json=exec_body, headers=headers
                )

            ok = run(grant.token)
            assert ok.status_code == 200 and ok.json()["stdout"] == "ok\n"
            assert _error(run(None)) == (401, "unauthorized")
            assert _error(run("garbage")) == (401, "unauthorized")
            prefix, payload, signature = grant.token.split(".")
            tampered = f"{prefix}.{payload}.{signature[::-1]}"
            assert _error(run(tampered)) == (401, "unauthorized")
            # The same claims signed with another secret: forged.
            forged, _ = dataplane_token.sign(
                b"not-the-cluster-secret", mine, namespace="team-a", token_name="alice", ttl=60
            )
            assert _error(run(forged)) == (401, "unauthorized")
            # Signed with the real secret but expired.
            scheduler = ray.get_actor("rock-scheduler", namespace=NAMESPACE)
            secret = ray.get(scheduler.dataplane_secret.remote())
            expired, _ = dataplane_token.sign(
                secret, mine, namespace="team-a", token_name="alice", ttl=-60
            )
            assert _error(run(expired)) == (401, "unauthorized")
            # A valid token of one sandbox does not open another (same node).
            assert _error(run(grant.token, theirs)) == (403, "permission_denied")
            # Bob cannot get a grant for alice's sandbox: it does not exist for him.
            assert _error(bob.post(f"/v1/sandboxes/{mine}/dataplane")) == (
                404,
                "sandbox_not_found",
            )
            # A bad body is a typed 400, not a crash.
            bad = node.post(
                f"/v1/sandboxes/{mine}/exec",
                json={"command": 5},
                headers={"Authorization": f"Bearer {grant.token}"},
            )
            assert _error(bad) == (400, "invalid_request")
    refused = _audit_events(
        app.audit,
        lambda e: e["action"] == "auth" and e["detail"].get("transport") == "direct",
        "refused data-plane tokens",
    )
    assert all(e["status"] in (401, 403) for e in refused)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_node_falls_back_to_the_admin(app: App) -> None:
    with app.sdk("alice") as client, client.sandbox(ttl_seconds=300) as sb:
        transport = client._transport
        assert isinstance(transport, DirectTransport)
        real = transport.grant(sb.id)
        assert real is not None
        dead = real.model_copy(update={"endpoint": f"http://127.0.0.1:{_closed_port()}"})
        transport._grants[sb.id] = (dead, time.time() + 600)
        assert sb.exec("echo via-admin").stdout == "via-admin\n"
        assert transport.fallbacks == 1
        assert sb.exec("echo again").stdout == "again\n"  # the dead node is left alone a while
        assert transport.fallbacks == 2
    with app.sdk("alice", "direct") as client, client.sandbox(ttl_seconds=300) as sb:
        transport = client._transport
        assert isinstance(transport, DirectTransport)
        real = transport.grant(sb.id)
        assert real is not None
        dead = real.model_copy(update={"endpoint": f"http://127.0.0.1:{_closed_port()}"})
        transport._grants[sb.id] = (dead, time.time() + 600)
        with pytest.raises(httpx.ConnectError):
            sb.exec("echo never")


def test_one_request_steps_a_group_of_sandboxes(app: App) -> None:
    from rock_serve.errors import SessionNotFound

    with (
        app.sdk("alice", "direct") as client,
        client.sandbox(ttl_seconds=300) as a,
        client.sandbox(ttl_seconds=300) as b,
    ):
        a.run("X=first")
        b.run("X=second")
        transport = client._transport
        assert isinstance(transport, DirectTransport)
        before = transport.direct_calls
        results = client.run_many([(a.id, "echo $X"), (b.id, "echo $X; false")])
        assert transport.direct_calls == before + 1  # one request for the whole group
        outputs = [r.output.strip() for r in results[:2]]  # type: ignore[union-attr]
        assert outputs == ["first", "second"]
        codes = [r.exit_code for r in results]  # type: ignore[union-attr]
        assert codes == [0, 1]
        missing = client.run_many([(a.id, "echo hi")], session="nope")
        assert isinstance(missing[0], SessionNotFound)
    runs = _audit_events(
        app.audit,
        lambda e: e["sandbox_id"] == b.id and e["detail"].get("batch") == 2,
        "the batched run",
    )
    assert runs[0]["token_name"] == "alice" and runs[0]["command"] == "echo $X; false"
