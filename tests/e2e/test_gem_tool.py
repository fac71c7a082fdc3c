"""The GEM tools against the session's platform.

gem-llm is not installed (it pulls reasoning-gym and friends); the tests drive the tools the way
GEM's ``ToolEnvWrapper.step`` does: every tool gets ``execute_action(action)``; the first one
that parses the action without error answers, otherwise the env itself steps.
"""

from __future__ import annotations

import pytest

from rock_serve.envs.integrations import GemBashTool, GemPythonTool
from rock_serve.sdk import Client

pytestmark = pytest.mark.ray


class AnswerEnv:
    """A one-question GEM-style text env: reward 1 for \\boxed{42}."""

    def reset(self, seed=None):
        return "What is 6 * 7?", {}

    def step(self, action):
        return "done", float("\\boxed{42}" in action), True, False, {}


class ToolWrapper:
    """GEM's ToolEnvWrapper.step/reset logic, in our words."""

    def __init__(self, env, tools, max_tool_uses=10):
        self.env, self.tools, self.max_tool_uses, self.uses = env, tools, max_tool_uses, 0

    def reset(self, seed=None):
        obs, info = self.env.reset(seed=seed)
        return obs + "\n" + "\n".join(t.instruction_string() for t in self.tools), info

    def step(self, action):
        parsed = False
        if self.uses < self.max_tool_uses:
            for tool in self.tools:
                parsed, error, observation, parsed_action = tool.execute_action(action)
                if parsed and not error:
                    break
        if parsed:
            self.uses += 1
            info = {"parsed_action": parsed_action, "tool_type": tool.tool_type}
            return observation, 0.0, False, False, info
        return self.env.step(action)


def _gem_sandboxes(api) -> list[str]:
    items = api.get("/v1/sandboxes", params={"label": "rock-serve/integration=gem"}).json()
    return [item["id"] for item in items["items"]]


def test_python_tool_in_a_wrapped_env(api, platform):
    with (
        GemPythonTool(base_url=platform.url, timeout=30) as python,
        GemBashTool(base_url=platform.url) as bash,
    ):
        env = ToolWrapper(AnswerEnv(), [python, bash])
        obs, _ = env.reset()
        assert "<python>" in obs and "<bash>" in obs

        action = "Let me compute. <python>print(6 * 7)</python> and then more text"
        obs, reward, terminated, _, info = env.step(action)
        assert obs == "Code execution result: 42\n\n"  # GEM keeps stdout's newline, adds one
        assert info == {
            "parsed_action": "Let me compute. <python>print(6 * 7)</python>",
            "tool_type": "python_code",
        }
        assert (reward, terminated) == (0.0, False)

        obs, *_ = env.step("```bash\necho from bash > note.txt; cat note.txt\n```")
        assert obs == "Code execution result: from bash\n\n"
        # No code block: the env steps and scores the answer.
        _, reward, terminated, _, _ = env.step("The answer is \\boxed{42}")
        assert (reward, terminated) == (1.0, True)
        assert len(_gem_sandboxes(api)) == 2  # one per tool, created on first use
    assert _gem_sandboxes(api) == []  # closing the tools deleted them


def test_python_tool_results(api, platform):
    with GemPythonTool(base_url=platform.url, timeout=30) as tool:
        assert tool.execute_action("no code here") == (False, True, "", "no code here")

        ok, err, obs, parsed = tool.execute_action(
            "```python\nprint('a')\n```\n<python>print('b')</python>"
        )
        assert (ok, err, obs) == (True, False, "Code execution result: a\n\n")  # first block wins
        assert parsed == "```python\nprint('a')\n```"

        wrote = tool.execute_action("<python>open('state.txt', 'w').write('kept')</python>")
        assert wrote[:2] == (True, False), wrote
        writer = tool.sandbox_id
        read = tool.execute_action("<python>print(open('state.txt').read())</python>")
        assert read[2] == "Code execution result: kept\n\n", (writer, tool.sandbox_id, read)

        ok, err, obs, _ = tool.execute_action("<python>print('x')\nraise KeyError('k')</python>")
        assert (ok, err) == (True, True)
        assert obs.startswith("Code execution result: x\n") and "KeyError: 'k'" in obs

        tool.timeout = 1  # for this step only: every other step has time to spare on a busy host
        ok, err, obs, _ = tool.execute_action("<python>import time\ntime.sleep(30)</python>")
        assert (ok, err) == (True, True) and "Execution timed out after 1 seconds." in obs
        tool.timeout = 30
        first = tool.sandbox_id
        assert first is not None

        # The sandbox vanishes behind the tool's back: an error result, then a new sandbox.
        with Client(platform.url) as client:
            client.delete_sandbox(first)
        ok, err, obs, _ = tool.execute_action("<python>print(1)</python>")
        assert (ok, err) == (True, True) and "sandbox error" in obs
        assert tool.execute_action("<python>print(1)</python>")[:3] == (
            True,
            False,
            "Code execution result: 1\n\n",
        )
        assert tool.sandbox_id not in (None, first)
    assert _gem_sandboxes(api) == []


def test_keep_error_last_line_and_shared_client(api, platform):
    with Client(platform.url) as client:
        tool = GemPythonTool(client=client, keep_error_last_line=True)
        obs = tool.execute_action("<python>1/0</python>")[2]
        assert obs == "Code execution result: ZeroDivisionError: division by zero\n"
        tool.close()
        # The shared client stays open for its owner.
        assert client.list_sandboxes(labels={"rock-serve/integration": "gem"}) == []
