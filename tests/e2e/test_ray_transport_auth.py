"""The Ray transport carries the caller's platform token and is audited like HTTP.

A platform deployed with auth required (three tokens: team-a, team-b, an admin) and an audit
log (``jobs_head`` in conftest: the second app on the Ray-job modules' shared head);
``jobs/ray_auth_job.py`` is submitted with `ray job submit` and calls the actors through
``AsyncClient.from_ray`` with no token, a forged one, and each real one. It must see exactly
what the same callers see over HTTP, and the audit log must hold the Ray calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ._head import BIN, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

JOB = Path(__file__).resolve().parent / "jobs" / "ray_auth_job.py"


def test_ray_transport_checks_the_token_and_audits(jobs_head, tmp_path):
    # the platform: the jobs head's second app (conftest), with these tokens and audit log
    ray_head, namespace = jobs_head.head, jobs_head.auth_namespace
    tokens, audit = jobs_head.tokens, jobs_head.audit
    secrets = tmp_path / "tokens.json"
    fd = os.open(secrets, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(tokens, f)

    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            ray_head.dashboard,
            "--",
            sys.executable,
            str(JOB),
            namespace,
            str(secrets),
        ],
        env=ray_head.env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
    lines = [line for line in submit.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, submit.stdout[-3000:]
    got = json.loads(lines[0].removeprefix("RESULT "))
    sid = got["sandbox"]

    # Anonymous: health without Workers (as GET /v1/health); everything else unauthorized.
    assert got["health_anonymous"] == ["ok", 0]
    assert got["health_admin_workers"] >= 1
    for key in ("create_without_token", "create_forged_token", "list_without_token"):
        assert got[key] == "unauthorized", key
    assert got["run_without_token"] == "unauthorized"
    # team-a works in its own namespace.
    assert got["a_namespace"] == "team-a"
    assert got["a_run"] == "hi\n"
    assert got["a_stream"][-2:] == ["streamed\n", None]
    assert got["a_list"] == [sid]
    # team-b cannot see or touch it: exactly as for an unknown id.
    for key in ("b_get", "b_run", "b_read", "b_exec", "b_delete", "b_stream"):
        assert got[key] == "sandbox_not_found", key
    assert got["b_list"] == []
    assert got["b_unconfined"] == "permission_denied"
    # The admin sees and deletes it.
    assert got["root_list"] == [sid]
    assert got["root_read"] == "a's note"

    # The audit log has the Ray calls, like HTTP's: who, what, outcome; never a token.
    def events() -> list[dict[str, Any]]:
        if not audit.exists():
            return []
        found = [json.loads(x) for x in audit.read_text().splitlines()]
        return [e for e in found if e.get("detail", {}).get("transport") == "ray"]

    def complete() -> list[dict[str, Any]] | None:
        found = events()
        return found if any(e["action"] == "delete" and e["code"] == "ok" for e in found) else None

    found = wait_for(complete, time.monotonic() + 60, "the Ray calls' audit events")
    seen = {(e["action"], e["token_name"], e["code"]) for e in found}
    assert ("auth", "-", "unauthorized") in seen
    assert ("create", "team-a", "ok") in seen
    assert ("session.run", "team-a", "ok") in seen
    assert ("file.write", "team-a", "ok") in seen
    assert ("session.run", "team-b", "sandbox_not_found") in seen
    assert ("exec", "team-b", "sandbox_not_found") in seen
    assert ("delete", "team-b", "sandbox_not_found") in seen
    assert ("delete", "root", "ok") in seen
    create = next(e for e in found if e["action"] == "create" and e["code"] == "ok")
    assert (create["sandbox_id"], create["namespace"], create["client"]) == (sid, "team-a", "ray")
    text = audit.read_text()
    assert not any(token in text for token in tokens.values())
