"""Fork (issue 16) above the runtime, no Ray: the Scheduler's Ray-transport gate for fork and
pause (token, namespace, audit), the typed refusal of a runtime that cannot fork, and the
parsing of the parent session's cwd and exported env.

The bwrap behaviour itself (copy-on-write children, refcounts, atomicity) is in
``tests/integration/test_fork.py``.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from rock_serve.auth import generate_token, hash_token
from rock_serve.config import ServerArgs
from rock_serve.deployments._fork import parse_session_probe
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.deployments.worker import Worker
from rock_serve.errors import NotSupported, SandboxNotFound, Unauthorized, http_status
from rock_serve.protocol import CreateSandboxRequest, SandboxState
from rock_serve.protocol.fork import ForkRequest
from rock_serve.runtime.fake import FakeRuntime

TOKENS = {name: generate_token() for name in ("alice", "bob")}


class _Directory:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def alive_nodes(self) -> list[str]:
        return [self.worker.node_id]

    async def ensure(self, node_id: str) -> Worker:
        return self.worker

    async def dead_jobs(self, job_ids: set[str]) -> set[str]:
        return set()


@pytest.fixture
async def scheduler(tmp_path):
    args = ServerArgs.model_validate(
        {
            "runtime": {"type": "fake"},
            "auth": {
                "tokens": [
                    {"name": n, "namespace": f"team-{n}", "sha256": hash_token(t)}
                    for n, t in TOKENS.items()
                ]
            },
            "audit": {"path": str(tmp_path / "audit.jsonl")},
        }
    )
    worker = Worker(args, "w1", "node-1", runtime=FakeRuntime())
    await worker.ready()
    s = Scheduler(args, directory=_Directory(worker))  # type: ignore[arg-type]
    yield s
    await s.close()
    await worker.shutdown()


async def test_fork_over_the_ray_transport_is_gated_and_audited(scheduler, tmp_path):
    record = await scheduler.create(CreateSandboxRequest(), "team-alice")
    req = ForkRequest(count=2)

    with pytest.raises(Unauthorized):
        await scheduler.ray_call(None, "fork", record.id, req, "team-alice")
    with pytest.raises(SandboxNotFound):  # another namespace: as an unknown sandbox
        await scheduler.ray_call(TOKENS["bob"], "fork", record.id, req, "team-bob")
    with pytest.raises(NotSupported) as refused:  # the fake runtime has no copy-on-write
        await scheduler.ray_call(TOKENS["alice"], "fork", record.id, req, "team-alice")
    assert http_status(refused.value.code) == 501
    assert [r.id for r in (await scheduler.list()).items] == [record.id]  # no child left
    with pytest.raises(NotSupported):
        await scheduler.ray_call(TOKENS["alice"], "pause", record.id, "team-alice")
    assert (await scheduler.get(record.id)).state == SandboxState.RUNNING

    gate = scheduler._ray_gate
    await gate.audit.flush()
    lines = Path(tmp_path / "audit.jsonl").read_text().splitlines()
    forks = [e for e in map(json.loads, lines) if e["action"] == "fork"]
    assert [(e["token_name"], e["code"]) for e in forks] == [("alice", "not_supported")]
    assert forks[0]["sandbox_id"] == record.id


def _probe(cwd: str, env: dict[str, str]) -> str:
    raw = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
    return f"{cwd}\n{base64.b64encode(raw).decode()}\n"


def test_the_session_probe_keeps_exports_not_shell_state():
    env = {"GOAL": "a=b\nc", "PATH": "/bin", "PWD": "/x", "SHLVL": "2", "_": "/bin/env"}
    assert parse_session_probe(_probe("/work dir", env)) == (
        "/work dir",
        {"GOAL": "a=b\nc", "PATH": "/bin"},
    )
    assert parse_session_probe("") is None
    assert parse_session_probe("relative\nAAAA\n") is None
    assert parse_session_probe("/ok\nnot base64!\n") is None
