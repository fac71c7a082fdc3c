"""The audit log end to end: a JSONL file and a Redis stream (a real redis-server on loopback).

The app is the one of ``test_auth.py`` (same tokens and users) under ``/audit``, with
``audit.path`` and ``audit.redis_url`` set. The events are read back from both sinks.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rock_serve.deployments._audit import TEXT_FIELDS
from tests._redis import RedisServer, have_redis_server

from .conftest import Platform
from .test_auth import USERS, AuthApp, deploy_auth_app, remove_auth_app

redis = pytest.importorskip("redis")
websockets_sync = pytest.importorskip("websockets.sync.client")

pytestmark = [pytest.mark.ray, pytest.mark.redis]

STREAM = "rock:audit:e2e"
SECRETS = {
    "create env value": "s3cr3t-create-env-value",
    "exec env value": "s3cr3t-exec-env-value",
    "exec stdin": "s3cr3t-stdin-data",
    "session env value": "s3cr3t-session-env-value",
    "session stdin": "s3cr3t-session-stdin",
    "file content": "s3cr3t-file-content",
    "process env value": "s3cr3t-process-env-value",
    "process input": "s3cr3t-process-input",
    "wrong token": "rk_s3cr3t-wrong-token",
}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port (no persistence), stopped at the end."""
    if not have_redis_server():
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


def _redis(server: RedisServer) -> Any:
    return redis.Redis.from_url(server.url, socket_timeout=5)


@pytest.fixture(scope="module")
def audit_app(
    platform: Platform, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuthApp]:
    tmp = tmp_path_factory.mktemp("audit")
    audit = {
        "path": str(tmp / "log" / "audit.jsonl"),
        "redis_url": redis_server.url,
        "redis_stream": STREAM,
        "redis_maxlen": 10_000,
    }
    app = deploy_auth_app(platform, "audit", tmp, audit=audit)
    yield app
    remove_auth_app(app, "audit")


def _file_events(app: AuthApp) -> list[dict[str, Any]]:
    assert app.audit_path is not None
    try:
        text = app.audit_path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def _wait_for(fetch: Any, predicate: Any, what: str, timeout: float = 30) -> list[dict[str, Any]]:
    """Poll a sink until ``predicate(events)``: the Admin writes them off the request path."""
    deadline = time.monotonic() + timeout
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        events = fetch()
        if predicate(events):
            return events
        time.sleep(0.1)
    raise AssertionError(f"{what}: {json.dumps(events, indent=1)[-3000:]}")


def _stream_events(server: RedisServer) -> list[dict[str, Any]]:
    with _redis(server) as client:
        entries = client.xrange(STREAM)
    out = []
    for _, fields in entries:
        event: dict[str, Any] = {}
        for key, value in fields.items():
            text = value.decode()
            key = key.decode()
            event[key] = text if key in TEXT_FIELDS else json.loads(text)
        out.append(event)
    return out


def _for(events: list[dict[str, Any]], sandbox_id: str) -> list[tuple[Any, ...]]:
    return [
        (e["action"], e["token_name"], e["status"], e["code"])
        for e in events
        if e.get("sandbox_id") == sandbox_id
    ]


def test_who_did_what_to_which_sandbox_and_how_it_ended(audit_app, redis_server):
    alice = audit_app.client("alice")
    bob = audit_app.client("bob")
    with alice, bob:
        resp = alice.post(
            "/v1/sandboxes",
            json={"ttl_seconds": 300, "env": {"CREATE_KEY": SECRETS["create env value"]}},
        )
        assert resp.status_code == 201, resp.text
        sid = resp.json()["id"]
        base = f"/v1/sandboxes/{sid}"
        exec_body = {
            "command": "echo audited-exec",
            "env": {"API_TOKEN": SECRETS["exec env value"]},
            "stdin": SECRETS["exec stdin"],
        }
        ran = alice.post(f"{base}/exec", json=exec_body)
        assert ran.status_code == 200 and ran.json()["exit_code"] == 0, ran.text
        session = {"session": "work", "env": {"PW": SECRETS["session env value"]}}
        session["startup_commands"] = ["cd /tmp"]
        assert alice.post(f"{base}/sessions", json=session).status_code == 200
        run = alice.post(f"{base}/sessions/work/run", json={"command": "echo run-cmd; (exit 3)"})
        assert run.status_code == 200, run.text
        stdin = alice.post(
            f"{base}/sessions/work/stdin", json={"data": SECRETS["session stdin"], "eof": True}
        )
        assert stdin.status_code in (204, 409), stdin.text  # nothing may be reading it
        content = SECRETS["file content"].encode()
        put = alice.put(f"{base}/files", params={"path": "notes.txt"}, content=content)
        assert put.status_code == 200, put.text
        assert alice.post(f"{base}/files/mkdir", json={"path": "d"}).status_code == 204
        removed = alice.post(f"{base}/files/remove", json={"path": "d", "recursive": True})
        assert removed.status_code == 204, removed.text
        proc = {"command": "cat", "stdin": True, "env": {"PK": SECRETS["process env value"]}}
        pid = alice.post(f"{base}/processes", json=proc).json()["pid"]
        fed = alice.post(f"{base}/processes/{pid}/input", json={"data": SECRETS["process input"]})
        assert fed.status_code == 200, fed.text
        assert alice.delete(f"{base}/processes/{pid}").json()["signal"] == 9
        assert bob.post(f"{base}/exec", json={"command": "echo bob-was-here"}).status_code == 404
        wrong = {"Authorization": f"Bearer {SECRETS['wrong token']}"}
        assert alice.post(f"{base}/exec", json=exec_body, headers=wrong).status_code == 401
        url = audit_app.url.replace("http://", "ws://", 1) + f"{base}/pty"
        token = audit_app.tokens["alice"]
        with websockets_sync.connect(f"{url}?token={token}") as ws:
            ws.send(b"exit 5\n")
            while isinstance(ws.recv(timeout=20), bytes):
                pass
        assert alice.delete(base).status_code == 204

    expected = [
        ("create", "alice", 201, "ok"),
        ("exec", "alice", 200, "ok"),
        ("session.create", "alice", 200, "ok"),
        ("session.run", "alice", 200, "ok"),
        ("session.stdin", "alice", stdin.status_code, "ok" if stdin.status_code == 204 else None),
        ("file.write", "alice", 200, "ok"),
        ("file.mkdir", "alice", 204, "ok"),
        ("file.remove", "alice", 204, "ok"),
        ("process.start", "alice", 201, "ok"),
        ("process.input", "alice", 200, "ok"),
        ("process.kill", "alice", 200, "ok"),
        ("exec", "bob", 404, "sandbox_not_found"),
        ("pty.open", "alice", 101, "ok"),
        ("pty.close", "alice", 200, "ok"),
        ("delete", "alice", 204, "ok"),
    ]

    def complete(events: list[dict[str, Any]]) -> bool:
        return len(_for(events, sid)) >= len(expected)

    for events in (
        _wait_for(lambda: _file_events(audit_app), complete, "file"),
        _wait_for(lambda: _stream_events(redis_server), complete, "stream"),
    ):
        got = _for(events, sid)
        assert [g[:3] for g in got] == [e[:3] for e in expected]
        assert all(e[3] is None or g[3] == e[3] for g, e in zip(got, expected, strict=True))
        ours = [e for e in events if e.get("sandbox_id") == sid]
        mine = {e["action"]: e for e in ours if e["token_name"] == "alice"}
        assert all(e["namespace"] == "team-a" and not e["admin"] for e in mine.values())
        (bobs,) = [e for e in ours if e["token_name"] == "bob"]
        assert (bobs["namespace"], bobs["command"]) == ("team-b", "echo bob-was-here")
        assert mine["create"]["env_keys"] == ["CREATE_KEY"]
        assert mine["exec"]["command"] == "echo audited-exec"
        assert mine["exec"]["env_keys"] == ["API_TOKEN"]
        assert mine["exec"]["detail"]["exit_code"] == 0
        assert mine["exec"]["detail"]["stdin_bytes"] == len(SECRETS["exec stdin"])
        assert mine["session.create"]["env_keys"] == ["PW"]
        assert mine["session.create"]["command"] == "cd /tmp"
        assert mine["session.run"]["command"] == "echo run-cmd; (exit 3)"
        assert mine["session.run"]["detail"]["exit_code"] == 3
        assert mine["file.write"]["path"] == "notes.txt"
        assert mine["file.write"]["detail"]["bytes"] == len(SECRETS["file content"])
        assert mine["pty.close"]["detail"]["exit_code"] == 5
        assert mine["process.start"]["command"] == "cat"
        assert mine["process.start"]["env_keys"] == ["PK"]
        assert mine["process.start"]["detail"]["pid"] == pid
        assert mine["process.input"]["detail"]["bytes"] == len(SECRETS["process input"])
        assert all(isinstance(e["ts"], float) and e["client"] for e in mine.values())
        refused = [e for e in events if e["action"] == "auth"]
        assert refused, "the wrong token was not audited"
        assert refused[-1]["code"] == "unauthorized"
        assert refused[-1]["detail"]["path"].endswith(f"{base}/exec")


def test_no_secret_reaches_the_audit_log(audit_app, redis_server):
    """Runs after the test above: every value it sent must be absent from both sinks."""
    assert audit_app.audit_path is not None
    _wait_for(lambda: _file_events(audit_app), lambda e: len(e) > 0, "file events")
    file_text = audit_app.audit_path.read_text()
    with _redis(redis_server) as client:
        stream_text = repr(client.xrange(STREAM))
    secrets = {**SECRETS, **{f"token of {u}": audit_app.tokens[u] for u, *_ in USERS}}
    for where, text in (("file", file_text), ("stream", stream_text)):
        leaked = [what for what, value in secrets.items() if value in text]
        assert leaked == [], f"{where} holds: {leaked}"
    assert oct(audit_app.audit_path.stat().st_mode & 0o777) == "0o600"


def test_a_dead_redis_never_fails_a_request(audit_app, redis_server, platform):
    redis_server.stop()
    with audit_app.client("alice") as alice:
        sid = alice.post("/v1/sandboxes", json={"ttl_seconds": 120}).json()["id"]
        out = alice.post(f"/v1/sandboxes/{sid}/exec", json={"command": "echo still-served"})
        assert out.status_code == 200, out.text
        assert out.json()["stdout"] == "still-served\n"
        assert alice.delete(f"/v1/sandboxes/{sid}").status_code == 204

    def has_exec(events: list[dict[str, Any]]) -> bool:
        return ("exec", "alice", 200, "ok") in _for(events, sid)

    _wait_for(lambda: _file_events(audit_app), has_exec, "the file sink kept writing")
    deadline = time.monotonic() + 60  # and the failures are counted (Ray exports every ~5 s)
    lines: list[str] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            text = httpx.get(f"http://127.0.0.1:{platform.metrics_port}/metrics", timeout=5).text
            lines = [x for x in text.splitlines() if x.startswith("ray_rock_audit_errors_total{")]
            if any('sink="redis"' in x for x in lines):
                return
        time.sleep(1)
    raise AssertionError(f"audit errors not counted: {lines}")


def test_the_audit_file_is_jsonl(audit_app):
    assert audit_app.audit_path is not None
    for line in Path(audit_app.audit_path).read_text().splitlines():
        assert json.loads(line)["id"]
