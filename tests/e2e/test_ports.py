"""Relayed ports end to end over REST: HTTP and WebSocket proxying, the TCP tunnel, the SDK,
``rock sandbox port-forward``, namespaces, audit, and deleting a sandbox ending its tunnels.

One app with tokens (``/ports-auth``, local runtime, audit to a file) and one sandbox with the
servers of ``_port_servers.py`` serve the whole module.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rock_serve.errors import PortClosed, SandboxNotFound
from rock_serve.sdk import Client
from tests._wait import wait_until

from .conftest import Platform
from .test_auth import AuthApp, deploy_auth_app

websockets_sync = pytest.importorskip("websockets.sync.client")
from websockets.exceptions import ConnectionClosed  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

SERVERS = Path(__file__).with_name("_port_servers.py")


class Box:
    """The module's sandbox (alice's) and the ports its servers listen on."""

    def __init__(self, app: AuthApp, client: Client, sandbox_id: str, ports: dict[str, int]):
        self.app = app
        self.client = client
        self.id = sandbox_id
        self.ports = ports

    def url(self, kind: str, path: str = "") -> str:
        return f"{self.app.url}/v1/sandboxes/{self.id}/ports/{self.ports[kind]}/{path}"

    def ws(self, kind: str, path: str = "") -> str:
        return self.url(kind, path).replace("http://", "ws://", 1)


def start_servers(client: Client, sandbox_id: str) -> dict[str, int]:
    """Start ``_port_servers.py`` in the sandbox; returns its ports once they listen."""
    from rock_serve.sdk._sync_sandbox import Sandbox

    sb = Sandbox(client, client.get_sandbox(sandbox_id), delete_on_exit=False, heartbeat=False)
    sb.files.write("port_servers.py", SERVERS.read_bytes())
    sb.run("python3 port_servers.py ports.json >servers.log 2>&1 &", session="servers")

    def ports() -> dict[str, int] | None:
        result = sb.exec("cat ports.json 2>/dev/null")
        return json.loads(result.stdout) if result.exit_code == 0 and result.stdout else None

    return wait_until(ports, what="the servers in the sandbox to listen")


def unused_port() -> int:
    """A port nothing listens on (the local runtime shares the host's network)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def app(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> AuthApp:
    tmp = tmp_path_factory.mktemp("ports-auth")
    audit = {"path": str(tmp / "audit.jsonl")}
    return deploy_auth_app(platform, "ports-auth", tmp, audit=audit)


@pytest.fixture(scope="module")
def box(app: AuthApp) -> Iterator[Box]:
    with Client(app.url, token=app.tokens["alice"]) as client:
        record = client.create_sandbox(owner="ports-test", ttl_seconds=600)
        try:
            yield Box(app, client, record.id, start_servers(client, record.id))
        finally:
            client.delete_sandbox(record.id)


def _alice(box: Box) -> dict[str, str]:
    return {"Authorization": f"Bearer {box.app.tokens['alice']}"}


def test_http_get_strips_our_credential_and_forwards_the_rest(box: Box) -> None:
    token = box.app.tokens["alice"]
    with httpx.Client(timeout=60) as http:
        # Token in the header; a cookie of ours next to the app's own.
        resp = http.get(
            box.url("http", "echo?x=1&y=two"),
            headers={**_alice(box), "Cookie": "app=1; rock_session=secret", "X-Custom": "v"},
        )
        assert resp.status_code == 200, resp.text
        seen = resp.json()
        headers = {k.lower(): v for k, v in seen["headers"].items()}
        assert seen["target"] == "/echo?x=1&y=two"
        assert "authorization" not in headers
        assert headers["cookie"] == "app=1"
        assert headers["x-custom"] == "v"
        assert headers["host"] == f"localhost:{box.ports['http']}"
        assert headers["x-forwarded-prefix"] == f"/v1/sandboxes/{box.id}/ports/{box.ports['http']}"
        # Token in the query (a browser): it is taken out of the forwarded target.
        resp = http.get(box.url("http", f"echo?token={token}&q=3"))
        assert resp.status_code == 200, resp.text
        assert resp.json()["target"] == "/echo?q=3"
        # Status, body and repeated headers of the upstream pass through.
        resp = http.get(box.url("http", "status/418"), headers=_alice(box))
        assert resp.status_code == 418
        assert resp.text == "status 418"
        assert resp.headers.get_list("set-cookie") == ["a=1", "b=2"]
        # HEAD: headers without a body.
        resp = http.head(box.url("http", "blob?n=1000"), headers=_alice(box))
        assert resp.status_code == 200
        assert resp.headers["content-length"] == "1000"
        # No token: 401, nothing reaches the sandbox.
        assert http.get(box.url("http", "echo")).status_code == 401


def test_http_bodies_stream_both_ways(box: Box) -> None:
    blob = os.urandom(3 << 20)

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked upload
        for i in range(0, len(blob), 100_000):
            yield blob[i : i + 100_000]

    with httpx.Client(timeout=120) as http:
        resp = http.post(box.url("http", "sum"), headers=_alice(box), content=chunks())
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"length": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        resp = http.put(box.url("http", "sum"), headers=_alice(box), content=blob[:12345])
        assert resp.json()["length"] == 12345
        n = 5 << 20
        with http.stream("GET", box.url("http", f"blob?n={n}"), headers=_alice(box)) as resp:
            assert resp.status_code == 200
            got = b"".join(resp.iter_bytes())
        assert len(got) == n
        assert got[:512] == bytes(range(256)) * 2


def test_port_closed_and_other_namespaces(box: Box) -> None:
    closed = unused_port()
    url = f"{box.app.url}/v1/sandboxes/{box.id}/ports/{closed}/"
    with httpx.Client(timeout=60) as http:
        resp = http.get(url, headers=_alice(box))
        assert resp.status_code == 502, resp.text
        assert resp.json()["error"]["code"] == "port_closed"
        bob = {"Authorization": f"Bearer {box.app.tokens['bob']}"}
        resp = http.get(box.url("http", "echo"), headers=bob)
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "sandbox_not_found"
        resp = http.get(f"{box.app.url}/v1/sandboxes/{box.id}/ports/70000/", headers=_alice(box))
        assert resp.status_code == 400
    # The same refusals on the WebSocket routes: an error body, then the close code.
    with websockets_sync.connect(box.ws("tcp", "tcp"), additional_headers=bob) as ws:
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "sandbox_not_found"
        with pytest.raises(Exception, match="1008"):
            ws.recv(timeout=30)
    ws_url = url.replace("http://", "ws://", 1) + "tcp"
    with websockets_sync.connect(ws_url, additional_headers=_alice(box)) as ws:
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "port_closed"
        with pytest.raises(Exception, match="1014"):
            ws.recv(timeout=30)


def test_websocket_proxy_echo_and_close_code(box: Box) -> None:
    with websockets_sync.connect(box.ws("ws", "chat"), additional_headers=_alice(box)) as ws:
        ws.send("hello")
        assert ws.recv(timeout=30) == "hello"
        big = os.urandom(300_000)
        ws.send(big)
        assert ws.recv(timeout=30) == big
        ws.send("close:4001")
        with pytest.raises(Exception, match="4001"):
            ws.recv(timeout=30)


def test_tcp_tunnel_and_sdk_stream(box: Box) -> None:
    with websockets_sync.connect(box.ws("tcp", "tcp"), additional_headers=_alice(box)) as ws:
        assert json.loads(ws.recv(timeout=30)) == {"type": "open", "port": box.ports["tcp"]}
        ws.send(b"ping-1")
        assert ws.recv(timeout=30) == b"ping-1"
        ws.send("eof")  # half-close: the echo server closes after EOF, so does the tunnel
        with pytest.raises(Exception, match="1000"):
            ws.recv(timeout=30)
    from rock_serve.sdk._sync_sandbox import Sandbox

    sb = Sandbox(box.client, box.client.get_sandbox(box.id), delete_on_exit=False, heartbeat=False)
    assert sb.ports.url(box.ports["http"], "/echo") == box.url("http", "echo")
    payload = os.urandom(2 << 20)
    with sb.ports.connect(box.ports["tcp"]) as stream:
        stream.write(payload)
        stream.write_eof()
        got = bytearray()
        while data := stream.read():
            got += data
    assert bytes(got) == payload
    with pytest.raises(PortClosed):
        sb.ports.connect(unused_port()).open()


def test_cli_port_forward_with_a_real_client(box: Box) -> None:
    local = unused_port()
    env = {**os.environ, "ROCK_BASE_URL": box.app.url, "ROCK_TOKEN": box.app.tokens["alice"]}
    cli = [sys.executable, "-m", "rock_serve.sdk.cli", "sandbox", "port-forward"]
    proc = subprocess.Popen(
        [*cli, box.id, f"{local}:{box.ports['http']}"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def get() -> httpx.Response | None:
            try:
                return httpx.get(f"http://127.0.0.1:{local}/echo?via=cli", timeout=30)
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                return None

        resp = wait_until(get, what="the forwarded port to answer")
        assert resp.status_code == 200
        assert resp.json()["target"] == "/echo?via=cli"
        with httpx.Client(base_url=f"http://127.0.0.1:{local}", timeout=60) as http:
            got = http.get("/blob?n=3000000")  # keep-alive: a second request, same tunnel
            assert len(got.content) == 3_000_000
            assert http.get("/echo").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "Stopped forwarding" in stderr


def test_deleting_the_sandbox_ends_its_tunnels_and_everything_is_audited(
    app: AuthApp, box: Box
) -> None:
    with Client(app.url, token=app.tokens["alice"]) as client:
        record = client.create_sandbox(owner="ports-test", ttl_seconds=600)
        ports = start_servers(client, record.id)
        url = f"{app.url}/v1/sandboxes/{record.id}/ports/{ports['tcp']}/tcp"
        url = url.replace("http://", "ws://", 1)
        with websockets_sync.connect(url, additional_headers=_alice(box)) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "open"
            ws.send(b"before delete")
            assert ws.recv(timeout=30) == b"before delete"
            client.delete_sandbox(record.id)
            last: Any = None
            with pytest.raises(ConnectionClosed):
                while True:
                    last = ws.recv(timeout=60)
            # The rocklet went with the sandbox: the tunnel says so, typed, and closes.
            assert json.loads(last)["error"]["code"] in (
                "rocklet_unavailable",
                "sandbox_not_found",
            ), last
        with pytest.raises(SandboxNotFound):
            client.get_sandbox(record.id)
    with httpx.Client(timeout=60, headers=_alice(box)) as http:  # one of each, for the audit
        assert http.get(box.url("http", "echo")).status_code == 200
        closed = f"{app.url}/v1/sandboxes/{box.id}/ports/{unused_port()}/"
        assert http.get(closed).status_code == 502
    assert app.audit_path is not None

    def events() -> list[dict[str, Any]]:
        lines = app.audit_path.read_text().splitlines() if app.audit_path.exists() else []
        found = [json.loads(line) for line in lines]
        return [e for e in found if e["action"] in ("port.open", "port.close")]

    def closes_of_the_deleted_one() -> list[dict[str, Any]]:
        return [e for e in events() if e["action"] == "port.close" and e["sandbox_id"] == record.id]

    ended = wait_until(closes_of_the_deleted_one, what="the tunnel's port.close event")
    assert ended[0]["detail"]["kind"] == "tcp"
    assert ended[0]["detail"]["sent"] == len(b"before delete")
    assert ended[0]["detail"]["received"] == len(b"before delete")
    kinds = {(e["action"], e["detail"]["kind"]) for e in events()}
    assert ("port.open", "http") in kinds and ("port.close", "http") in kinds
    refused = [e for e in events() if e["action"] == "port.open" and e["code"] == "port_closed"]
    assert refused and refused[0]["status"] == 502
