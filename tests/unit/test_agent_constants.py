"""The rocklet is one stdlib-only file set, so it cannot import ``protocol`` or ``errors``: its
constants and error codes are tested against them here (issue 13 item 1)."""

from __future__ import annotations

import re
from pathlib import Path

from rock_serve import protocol
from rock_serve.config import ServerArgs
from rock_serve.errors import ErrorCode
from rock_serve.protocol import commands
from rock_serve.rocklet import agent

ROCKLET = Path(agent.__file__).parent
#: Codes the agent puts on the wire: ``AgentError("code", ...)``, ``{"code": "..."}``, and
#: the errno table of ``_os_error``.
_CODE = re.compile(
    r'AgentError\(\s*"([a-z_]+)"|"code":\s*"([a-z_]+)"|errno\.E[A-Z]+:\s*"([a-z_]+)"'
)


def _agent_codes() -> set[str]:
    found: set[str] = set()
    for path in ROCKLET.glob("*.py"):
        if path.name in {"handle.py", "http.py", "_swerex.py"}:  # host-side, they import errors
            continue
        for match in _CODE.finditer(path.read_text()):
            found.add(next(g for g in match.groups() if g))
    return found


def test_the_agents_defaults_are_the_protocols() -> None:
    assert agent.DEFAULT_TIMEOUT == protocol.DEFAULT_TIMEOUT
    assert agent.DEFAULT_MAX_OUTPUT == protocol.DEFAULT_MAX_OUTPUT
    assert agent.SESSION_NAME.pattern == commands.SESSION_NAME
    defaults = ServerArgs()
    assert agent.DEFAULT_MAX_SESSIONS == defaults.max_sessions_per_sandbox
    assert agent.DEFAULT_MAX_PROCS == defaults.max_processes_per_sandbox


def test_every_code_the_agent_sends_is_in_the_error_table() -> None:
    codes = _agent_codes()
    # the errno table (resource exhaustion's "resource" values are details, not codes)
    codes -= {"pids", "memory", "files", "disk"}
    assert {"invalid_request", "file_not_found", "resource_exhausted"} <= codes  # the scan works
    known = {c.value for c in ErrorCode}
    assert sorted(codes - known) == []
