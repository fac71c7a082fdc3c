"""One trace id from the SDK through the Admin and the Worker into the rocklet (issue 17.5),
on the real platform (Ray + Serve, local runtime): found in the Admin's, the Worker's (Ray's
``worker-*.err`` files) and the rocklet's (its ``agent.log``) lines; on a stream's reply
headers and in the Worker's stream lines; on the pty WebSocket's accept headers.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from rock_serve.errors import RockError
from rock_serve.sdk import Client
from tests._wait import wait_until

from .conftest import Platform

pytestmark = pytest.mark.ray


def _ray_lines(trace_id: str) -> list[str]:
    """Lines of this Ray session's actor stderr files (Admin, Scheduler, Worker) with the id."""
    from ray._private import worker as ray_worker

    node = ray_worker._global_node
    assert node is not None
    marker = f"trace={trace_id}"
    return [
        line
        for path in Path(node.get_logs_dir_path()).glob("worker-*.err")
        for line in path.read_text(errors="replace").splitlines()
        if marker in line
    ]


def _logger(line: str, trace_id: str) -> str:
    return line.split(f" trace={trace_id}")[0].split()[-1]


def _admin_request(sandbox_id: str, status: int) -> dict[str, Any] | None:
    """The Admin's structured line for a failed call on ``sandbox_id``'s exec, if written."""
    from ray._private import worker as ray_worker

    node = ray_worker._global_node
    assert node is not None
    for path in Path(node.get_logs_dir_path()).glob("worker-*.err"):
        for line in path.read_text(errors="replace").splitlines():
            if " rock_serve.requests " in line and f"/v1/sandboxes/{sandbox_id}/exec" in line:
                event: dict[str, Any] = json.loads(line[line.index("{") :])
                if event["status"] == status:
                    return event
    return None


def _agent_lines(platform: Platform, sandbox_id: str, trace_id: str) -> list[dict[str, Any]]:
    log = platform.state_dir / sandbox_id / "agent.log"
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"trace":"{trace_id}"' in line:
            found.append(json.loads(line))
    return found


def test_one_exec_from_the_sdk_has_one_id_in_admin_worker_and_rocklet_lines(
    platform: Platform,
) -> None:
    with Client(platform.url, dataplane="admin") as client:  # type: ignore[arg-type]
        sandbox = client.create_sandbox(owner="trace-test", ttl_seconds=300)
        try:
            with pytest.raises(RockError) as failed:  # a failed call: every layer logs it
                client.exec(sandbox.id, ["true"], cwd=f"/no-such-dir-{uuid.uuid4().hex}")
            status = failed.value.status
            event = wait_until(lambda: _admin_request(sandbox.id, status), what="Admin line")
            trace_id = event["trace_id"]
            code = failed.value.code.value

            def everywhere() -> bool:
                loggers = {_logger(line, trace_id) for line in _ray_lines(trace_id)}
                rocklet = [
                    (line["event"], line.get("outcome"))
                    for line in _agent_lines(platform, sandbox.id, trace_id)
                ]
                return {
                    "rock_serve.requests",  # the Admin's request line
                    "rock_serve.deployments.worker",  # "call exec failed: <code>"
                } <= loggers and rocklet == [("op.start", None), ("op.end", code)]

            wait_until(everywhere, what=f"trace {trace_id} in Admin, Worker, rocklet lines")
        finally:
            client.delete_sandbox(sandbox.id)


def test_a_stream_and_the_pty_websocket_carry_the_trace_id(platform: Platform) -> None:
    websockets_sync = pytest.importorskip("websockets.sync.client")
    trace_id = uuid.uuid4().hex
    headers = {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
    with httpx.Client(base_url=platform.url, timeout=60) as api:
        resp = api.post("/v1/sandboxes", json={"owner": "trace-test", "ttl_seconds": 300})
        assert resp.status_code == 201, resp.text
        sandbox_id = resp.json()["id"]
        try:
            with api.stream(
                "POST",
                f"/v1/sandboxes/{sandbox_id}/exec",
                params={"stream": "true"},
                json={"command": "echo streamed"},
                headers=headers,
            ) as streamed:
                assert streamed.status_code == 200
                assert streamed.headers["x-trace-id"] == trace_id
                lines = [json.loads(line) for line in streamed.iter_lines() if line]
            assert lines[-1]["exit_code"] == 0

            def stream_logged() -> bool:
                messages = [line.split(f"trace={trace_id} ", 1)[1] for line in _ray_lines(trace_id)]
                started = f"stream exec of {sandbox_id} started" in messages
                ended = any(m.startswith(f"stream exec of {sandbox_id} ended") for m in messages)
                return started and ended

            wait_until(stream_logged, what="the Worker's stream start and end lines")
            ops = {(x["op"], x["event"]) for x in _agent_lines(platform, sandbox_id, trace_id)}
            assert ops == {("exec", "op.start"), ("exec", "op.end")}

            ws_trace = uuid.uuid4().hex
            url = platform.url.replace("http://", "ws://", 1) + f"/v1/sandboxes/{sandbox_id}/pty"
            with websockets_sync.connect(
                url, additional_headers={"traceparent": f"00-{ws_trace}-b7ad6b7169203331-01"}
            ) as ws:
                assert ws.response.headers["x-trace-id"] == ws_trace
                ws.send(b"exit 3\n")
                wait_until(
                    lambda: any(
                        m.startswith(f"stream pty of {sandbox_id} started")
                        for m in (x.split(f"trace={ws_trace} ", 1)[1] for x in _ray_lines(ws_trace))
                    ),
                    what="the Worker's pty stream line",
                )
        finally:
            api.delete(f"/v1/sandboxes/{sandbox_id}")
