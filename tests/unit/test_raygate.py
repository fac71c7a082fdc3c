"""The Worker's Ray-transport entry points (``Worker.ray_op``/``ray_op_stream`` for sandbox
operations, ``ray_call`` for the rest) on the fake runtime: the platform token is checked,
namespaces are scoped as over HTTP, calls are audited.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rock_serve.auth import generate_token, hash_token
from rock_serve.config import ServerArgs
from rock_serve.deployments.worker import Worker
from rock_serve.errors import InvalidRequest, SandboxNotFound, Unauthorized
from rock_serve.protocol import (
    CreateSandboxRequest,
    ExecRequest,
    SessionCreateRequest,
    SessionRunRequest,
    SessionRunResult,
)
from rock_serve.protocol.ops import ExecOp, FileReadOp, SessionCreateOp, SessionRunOp, StatsOp
from rock_serve.runtime.fake import FakeRuntime

TOKENS = {name: generate_token() for name in ("alice", "bob", "root")}


def _args(audit: Path) -> ServerArgs:
    entries = [
        {"name": "alice", "namespace": "team-a", "sha256": hash_token(TOKENS["alice"])},
        {"name": "bob", "namespace": "team-b", "sha256": hash_token(TOKENS["bob"])},
        {"name": "root", "namespace": "ops", "sha256": hash_token(TOKENS["root"]), "admin": True},
    ]
    return ServerArgs.model_validate(
        {
            "runtime": {"type": "fake"},
            "auth": {"tokens": entries},
            "audit": {"path": str(audit)},
        }
    )


@pytest.fixture
async def worker(tmp_path):
    w = Worker(_args(tmp_path / "audit.jsonl"), "w1", "node-1", runtime=FakeRuntime())
    await w.ready()
    yield w
    await w.shutdown()


async def _events(worker: Worker) -> list[dict]:
    gate = worker._ray_gate()
    await gate.audit.flush()
    path = Path(gate.args.audit.path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_the_token_decides_who_may_call(worker):
    sid = "sb-w1-0123456789abcdef"
    await worker.create(sid, CreateSandboxRequest(), ttl=600, namespace="team-a")
    await worker.op(sid, SessionCreateOp.of(SessionCreateRequest()))
    run = SessionRunOp(command="echo hi")

    with pytest.raises(Unauthorized):
        await worker.ray_op(None, sid, run)
    with pytest.raises(Unauthorized):
        await worker.ray_op("rock_forged", sid, run)
    result = await worker.ray_op(TOKENS["alice"], sid, run)
    assert result.output == "hi\n"
    # Another namespace: exactly as an unknown sandbox; an admin passes.
    with pytest.raises(SandboxNotFound):
        await worker.ray_op(TOKENS["bob"], sid, ExecOp(command="echo x"))
    with pytest.raises(SandboxNotFound):
        await worker.ray_op(TOKENS["bob"], sid, FileReadOp(path="/etc/hostname"))
    out = await worker.ray_op(TOKENS["root"], sid, ExecOp(command="echo root"))
    assert out.stdout == "root\n"
    # Only the SDK's methods: not shutdown, reconfigure or the Worker's internals, and the
    # sandbox operations only as typed models (not by their old method names).
    for method in ("shutdown", "reconfigure", "remove", "_box", "ray_call", "exec", "op"):
        with pytest.raises(InvalidRequest):
            await worker.ray_call(TOKENS["root"], method, sid)
    # A plain request model is not an operation.
    with pytest.raises(InvalidRequest):
        await worker.ray_op(TOKENS["root"], sid, ExecRequest(command="echo x"))  # type: ignore[arg-type]
    # An operation that does not stream is refused by the streaming entry point.
    with pytest.raises(InvalidRequest):
        async for _ in worker.ray_op_stream(TOKENS["root"], sid, StatsOp()):  # type: ignore[arg-type]
            pass

    items = [
        item
        async for item in worker.ray_op_stream(
            TOKENS["alice"], sid, SessionRunOp.of(SessionRunRequest(command="echo s"))
        )
    ]
    assert isinstance(items[-1], SessionRunResult)  # (the e2e test checks the output)
    assert items[-1].exit_code == 0
    with pytest.raises(SandboxNotFound):
        async for _ in worker.ray_op_stream(TOKENS["bob"], sid, ExecOp(command="echo x")):
            pass

    events = await _events(worker)
    seen = [(e["action"], e["token_name"], e["code"], e["client"]) for e in events]
    assert ("auth", "-", "unauthorized", "ray") in seen
    assert ("session.run", "alice", "ok", "ray") in seen
    assert ("exec", "bob", "sandbox_not_found", "ray") in seen
    assert ("exec", "root", "ok", "ray") in seen
    assert all(e["detail"]["transport"] == "ray" for e in events)
    run_event = next(e for e in events if e["action"] == "session.run" and e["code"] == "ok")
    assert (run_event["sandbox_id"], run_event["namespace"], run_event["command"]) == (
        sid,
        "team-a",
        "echo hi",
    )
    text = Path(worker._ray_gate().args.audit.path).read_text()
    assert not any(token in text for token in TOKENS.values())
