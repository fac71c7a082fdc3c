"""The in-sandbox LLM relay of rock_serve.agents, run on the host (it is stdlib-only): an
"agent" process calls OPENAI_BASE_URL with urllib; the test answers through the same files and
commands the SDK and the env use (``next_argv``, ``response_body``), including errors, a
stream, a bad body and an unanswered call (typed ``llm_timeout``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rock_serve.agents import ScriptedPolicy, action_message, completion
from rock_serve.agents._protocol import (
    LLM_DIR,
    CallEvent,
    ExitEvent,
    launch_files,
    next_argv,
    parse_event,
    response_body,
)
from rock_serve.agents._tasks import builtin_task

AGENT = textwrap.dedent(
    """
    import json, os, sys, urllib.request, urllib.error
    base = os.environ["OPENAI_BASE_URL"]
    assert os.environ["OPENAI_API_KEY"]

    def post(body, raw=None):
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(base + "/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.headers.get("Content-Type"), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type"), e.read().decode()

    msgs = [{"role": "user", "content": "hi"}]
    if sys.argv[1:] == ["unanswered"]:
        status, _, body = post({"model": "m", "messages": msgs})
        print(json.dumps([status, json.loads(body)["error"]["code"]]))
        sys.exit(0)
    out = {}
    status, _, body = post({"model": "m", "messages": msgs})
    out["plain"] = [status, json.loads(body)["choices"][0]["message"]["content"]]
    status, ctype, body = post({"model": "m", "messages": msgs, "stream": True})
    out["stream"] = [status, ctype, body]
    status, _, body = post({"model": "m", "messages": msgs})
    out["failed"] = [status, json.loads(body)["error"]["code"]]
    status, _, body = post(None, raw=b"{not json")
    out["bad"] = [status, json.loads(body)["error"]["code"]]
    with urllib.request.urlopen(base + "/models") as r:
        out["models"] = json.loads(r.read())["data"][0]["id"]
    print(json.dumps(out))
    sys.exit(3)
    """
)


def _setup(base: Path) -> None:
    for path, content in launch_files(builtin_task()).items():
        (base / path).parent.mkdir(parents=True, exist_ok=True)
        (base / path).write_text(content)
    (base / "agent.py").write_text(AGENT)


def _serve(base: Path, timeout: float, *agent_args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, f"{LLM_DIR}/relay.py", "serve", LLM_DIR, "--timeout", str(timeout),
         "--", sys.executable, "agent.py", *agent_args],
        cwd=base, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def _next(base: Path, n: int) -> CallEvent | ExitEvent:
    proc = subprocess.run(next_argv(n, 30), cwd=base, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    event = parse_event(proc.stdout)
    assert event is not None
    return event


def _answer(base: Path, n: int, answer: dict | None, error: str | None = None) -> None:
    path, body = response_body(n, answer, error)
    (base / path).write_text(body)


def test_relay_round_trips_errors_and_exit(tmp_path: Path):
    _setup(tmp_path)
    relay = _serve(tmp_path, 60)
    try:
        first = _next(tmp_path, 1)
        assert isinstance(first, CallEvent) and first.request["messages"][0]["content"] == "hi"
        _answer(tmp_path, 1, completion("hello there", first.request, n=1))
        second = _next(tmp_path, 2)
        assert isinstance(second, CallEvent) and second.request["stream"] is True
        _answer(tmp_path, 2, completion("streamed", second.request, n=2))
        third = _next(tmp_path, 3)
        assert isinstance(third, CallEvent)
        _answer(tmp_path, 3, None, "the trainer gave up")
        # The bad body never becomes a call.
        assert _next(tmp_path, 4) == ExitEvent(exit_code=3, calls=3)
        out, _ = relay.communicate(timeout=30)
    finally:
        relay.kill()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["plain"] == [200, "hello there"]
    status, ctype, body = result["stream"]
    assert (status, ctype) == (200, "text/event-stream")
    chunk = json.loads(body.split("\n\n")[0].removeprefix("data: "))
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"][0]["delta"]["content"] == "streamed"
    assert body.rstrip().endswith("data: [DONE]")
    assert result["failed"] == [502, "llm_failed"]
    assert result["bad"] == [400, "invalid_request"]
    assert result["models"] == "rock-relay"


def test_an_unanswered_call_times_out_typed(tmp_path: Path):
    _setup(tmp_path)
    relay = _serve(tmp_path, 0.3, "unanswered")
    try:
        assert isinstance(_next(tmp_path, 1), CallEvent)
        assert _next(tmp_path, 2) == ExitEvent(exit_code=0, calls=1)
        out, _ = relay.communicate(timeout=30)
    finally:
        relay.kill()
    assert json.loads(out.strip().splitlines()[-1]) == [504, "llm_timeout"]


def test_relay_reports_an_agent_that_cannot_start(tmp_path: Path):
    (tmp_path / LLM_DIR).mkdir()
    (tmp_path / LLM_DIR / "relay.py").write_text(
        launch_files(builtin_task())[f"{LLM_DIR}/relay.py"]
    )
    proc = subprocess.run(
        [sys.executable, f"{LLM_DIR}/relay.py", "serve", LLM_DIR, "--", "/nonexistent/agent"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and "cannot start" in proc.stderr
    assert _next(tmp_path, 1) == ExitEvent(exit_code=127, calls=0)


def test_scripted_policy_answers_by_conversation_length():
    policy = ScriptedPolicy(["a", "b"])
    assert policy({"messages": [{"role": "system"}, {"role": "user"}]}) == "a"
    assert policy.reply([{"role": "assistant"}]) == "b"
    assert policy.reply([{"role": "assistant"}] * 5) == "b"
    assert "```mswea_bash_command\nls\n```" in action_message("ls")
    with pytest.raises(ValueError, match="at least one"):
        ScriptedPolicy([])


def test_bad_agent_task_and_limits_are_typed():
    from rock_serve.agents._protocol import agent_argv
    from rock_serve.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="unknown agent"):
        agent_argv("no-such-agent", builtin_task(), step_limit=5)
    with pytest.raises(InvalidRequest, match="step_limit"):
        agent_argv("mini-swe-agent", builtin_task(), step_limit=0)
    with pytest.raises(InvalidRequest, match="unknown agent task"):
        builtin_task("nope")
    argv = agent_argv("mini-swe-agent", builtin_task(), step_limit=7)
    assert argv[:3] == ["mini", "-y", "--exit-immediately"] and "agent.step_limit=7" in argv


def test_public_surface_is_pinned():
    import rock_serve.agents as agents

    assert set(agents.__all__) == {
        "AGENTS", "AGENT_IMAGE", "BUILTIN_TASKS", "SUBMIT", "AgentOutcome", "AgentRun",
        "AgentTask", "HTTPPolicy", "LLMCall", "Policy", "ScriptedPolicy", "action_message",
        "builtin_task", "completion", "llm_calls", "run_agent", "solution_replies", "start_agent",
    }  # fmt: skip
    for name in agents.__all__:
        assert getattr(agents, name) is not None


def test_agent_task_env_kwargs_are_checked():
    from rock_serve.envs.builtin.agent_task import AgentTaskEnv
    from rock_serve.errors import InvalidRequest

    env = AgentTaskEnv(step_limit=5)
    assert env.task.id == "fix_add" and env.sandbox_defaults["image"].endswith(":agent-mini")
    with pytest.raises(InvalidRequest, match="unknown agent task"):
        AgentTaskEnv(task="nope")
    with pytest.raises(InvalidRequest, match="unknown agent"):
        AgentTaskEnv(agent="aider")
    with pytest.raises(InvalidRequest, match="wait_timeout"):
        AgentTaskEnv(wait_timeout=0)
