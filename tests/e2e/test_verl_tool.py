"""The verl tool against the session's platform, driven the way verl drives tools.

verl is not installed (it pulls torch); the tests replay its call sequences: the 0.9.1 tool agent
loop (``_call_tool``: create -> execute(agent_data=...) -> release in ``finally`` for every call,
several calls of one turn gathered concurrently, errors turned into text, text cut to 256
characters in the middle), and the older per-trajectory sequence (create -> execute ... ->
calc_reward -> release). The tools are loaded from ``examples/verl_tool_config.yaml`` the way
verl's ``initialize_tools_from_config`` does: import ``class_name``, validate ``tool_schema``,
call ``cls(config=..., tool_schema=...)``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from rock_serve.envs.integrations import OpenAIFunctionToolSchema, ToolResponse, VerlSandboxTool
from rock_serve.errors import NotFound

pytestmark = pytest.mark.ray

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "verl_tool_config.yaml"
MAX_TOOL_RESPONSE = 256  # verl's default max_tool_response_length


class AgentData:
    """The part of verl's AgentData that tools see."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.extra_fields: dict[str, Any] = {}


def load_tools(url: str, **overrides: Any) -> dict[str, VerlSandboxTool]:
    """What verl's initialize_tools_from_config does with our YAML."""
    tools = {}
    for entry in yaml.safe_load(CONFIG.read_text())["tools"]:
        module, _, name = entry["class_name"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        schema = OpenAIFunctionToolSchema.model_validate(entry["tool_schema"])
        tool = cls(config={**entry["config"], "base_url": url, **overrides}, tool_schema=schema)
        tools[tool.name] = tool
    return tools


async def call_tool(tool, args_json: str, agent_data: AgentData, tools_kwargs: dict) -> tuple:
    """verl 0.9.1's ToolAgentLoop._call_tool for a BaseTool, in our words."""
    try:
        args = json.loads(args_json)
    except json.JSONDecodeError as exc:
        return ToolResponse(text=f"Invalid JSON in arguments: {exc}"), 0.0, {}
    instance_id = None
    try:
        kwargs = tools_kwargs.get(tool.name, {})
        instance_id, _ = await tool.create(create_kwargs=kwargs.get("create_kwargs", {}))
        response, reward, metrics = await tool.execute(instance_id, args, agent_data=agent_data)
    except Exception as exc:
        return ToolResponse(text=f"Error executing tool '{tool.name}': {exc}"), 0.0, {}
    finally:
        if instance_id:
            await tool.release(instance_id)
    text = response.text or ""
    if len(text) > MAX_TOOL_RESPONSE:  # truncate side "middle", verl's default
        half = MAX_TOOL_RESPONSE // 2
        text = text[:half] + "...(truncated)..." + text[-half:]
    return ToolResponse(text=text), reward, metrics


def _verl_sandboxes(api) -> list[str]:
    items = api.get("/v1/sandboxes", params={"label": "rock-serve/integration=verl"}).json()
    return [item["id"] for item in items["items"]]


def test_tool_agent_loop_keeps_one_sandbox_per_trajectory(api, platform):
    tools = load_tools(platform.url, idle_ttl_seconds=300)
    bash = tools["bash"]
    create_kwargs = {
        "files": {"verify.sh": 'test "$(cat answer.txt)" = 42 && echo 1.0 || echo 0.25\n'},
        "setup_commands": ["mkdir -p work"],
    }
    tools_kwargs = {"bash": {"create_kwargs": create_kwargs}}

    async def trajectory(n: int) -> tuple[str, float, set[str]]:
        agent = AgentData(request_id=f"req-{n}")
        seen: set[str] = set()
        # Turn 1: two calls in parallel (max_parallel_calls), as verl gathers them.
        turn = await asyncio.gather(
            call_tool(bash, json.dumps({"command": "cd work && X=" + str(n)}), agent, tools_kwargs),
            call_tool(bash, json.dumps({"command": "echo started"}), agent, tools_kwargs),
        )
        seen |= {metrics["sandbox_id"] for _, _, metrics in turn}
        # Turn 2: the shell kept its cwd and variables.
        resp, reward, metrics = await call_tool(
            bash, json.dumps({"command": "echo $X in $(basename $PWD)"}), agent, tools_kwargs
        )
        assert resp.text == f"{n} in work\n" and reward == 0.0
        seen.add(metrics["sandbox_id"])
        # Turn 3: a failing command reports its exit code last, even after truncation.
        resp, _, metrics = await call_tool(
            bash, json.dumps({"command": "seq 1 500; false"}), agent, tools_kwargs
        )
        assert resp.text.endswith("500\n[exit code 1]") and "...(truncated)..." in resp.text
        seen.add(metrics["sandbox_id"])
        # Turn 4: bad arguments become text, as in verl.
        resp, _, _ = await call_tool(bash, "{not json", agent, tools_kwargs)
        assert resp.text.startswith("Invalid JSON")
        resp, _, _ = await call_tool(bash, json.dumps({"cmd": "ls"}), agent, tools_kwargs)
        assert "'command' argument" in resp.text
        answer = "42" if n != 2 else "41"
        await call_tool(
            bash, json.dumps({"command": f"echo {answer} > ../answer.txt"}), agent, tools_kwargs
        )
        # The reward at the end: a fresh instance, bound to the same request.
        iid, _ = await bash.create(create_kwargs=create_kwargs)
        reward = await bash.calc_reward(iid, agent_data=agent)
        await bash.release(iid)
        return agent.request_id, reward, seen

    async def scenario() -> None:
        results = await asyncio.gather(*(trajectory(n) for n in range(3)))
        ids = [seen for _, _, seen in results]
        assert all(len(s) == 1 for s in ids)  # one sandbox per trajectory...
        assert len(set().union(*ids)) == 3  # ...and not shared between them
        assert [reward for _, reward, _ in results] == [1.0, 1.0, 0.25]
        # Per-call releases left the trajectories' sandboxes alone.
        assert sorted(_verl_sandboxes(api)) == sorted(set().union(*ids))
        assert await bash.release_trajectory("req-0") is True
        assert await bash.release_trajectory("req-0") is False
        assert len(_verl_sandboxes(api)) == 2
        await bash.aclose()
        assert _verl_sandboxes(api) == []
        await tools["code_interpreter"].aclose()

    asyncio.run(scenario())


def test_instance_per_trajectory_release_deletes_the_sandbox(api, platform):
    tool = VerlSandboxTool(
        {"base_url": platform.url, "kind": "bash", "reward_command": "test -f done"}
    )

    async def trajectory(n: int) -> float:
        iid, created = await tool.create()
        assert created.text == ""
        await tool.execute(iid, {"command": f"N={n}"})
        resp, _, _ = await tool.execute(iid, {"command": "echo $N"})
        assert resp.text == f"{n}\n"
        if n % 2 == 0:
            await tool.execute(iid, {"command": "touch done"})
        reward = await tool.calc_reward(iid)
        assert len(tool.sandboxes) >= 1
        await tool.release(iid)
        return reward

    async def scenario() -> None:
        rewards = await asyncio.gather(*(trajectory(n) for n in range(3)))
        assert rewards == [1.0, 0.0, 1.0]
        assert tool.sandboxes == {}
        assert _verl_sandboxes(api) == []
        with pytest.raises(NotFound):
            await tool.execute("never-created", {"command": "true"})
        await tool.aclose()

    asyncio.run(scenario())


def test_idle_reaper_deletes_abandoned_trajectories(api, platform):
    tool = VerlSandboxTool(
        {
            "base_url": platform.url,
            "idle_ttl_seconds": 0.5,
            "reap_interval_seconds": 0.1,
            "ttl_seconds": 120,
        }
    )

    async def scenario() -> None:
        agent = AgentData("abandoned")
        iid, _ = await tool.create()
        _, _, first = await tool.execute(iid, {"command": "Y=1"}, agent_data=agent)
        await tool.release(iid)  # per-call: the sandbox stays for the trajectory
        assert list(tool.sandboxes.values()) == [first["sandbox_id"]]
        # The trainer never comes back: the reaper removes it.
        deadline = time.monotonic() + 20
        while (tool.sandboxes or _verl_sandboxes(api)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert tool.sandboxes == {}
        assert _verl_sandboxes(api) == []
        # A late call of the same request gets a fresh sandbox (its state is gone).
        iid, _ = await tool.create()
        resp, _, again = await tool.execute(iid, {"command": "echo ${Y:-unset}"}, agent_data=agent)
        assert resp.text == "unset\n" and again["sandbox_id"] != first["sandbox_id"]
        await tool.release(iid)
        # reap_idle with a clock far ahead ends it at once.
        assert await tool.reap_idle(now=time.monotonic() + 3600) == ["request:abandoned"]
        assert _verl_sandboxes(api) == []
        # The server-side TTL is the backstop for a trainer that dies.
        await tool.aclose()

    asyncio.run(scenario())


def test_python_kind_and_timeouts(api, platform):
    tools = load_tools(platform.url, timeout=30)
    code = tools["code_interpreter"]
    assert code.get_openai_tool_schema().function.name == "code_interpreter"
    schema = code.get_openai_tool_schema().model_dump(exclude_unset=True, exclude_none=True)
    assert schema["function"]["parameters"]["required"] == ["code"]

    async def scenario() -> None:
        agent = AgentData("py")
        resp, _, _ = await call_tool(
            code,
            json.dumps({"code": "open('f.txt','w').write('kept')\nprint(6 * 7)"}),
            agent,
            {},
        )
        assert resp.text == "42\n"
        resp, _, _ = await call_tool(
            code, json.dumps({"code": "print(open('f.txt').read())"}), agent, {}
        )
        assert resp.text == "kept\n"
        resp, _, _ = await call_tool(code, json.dumps({"code": "1/0"}), agent, {})
        assert "ZeroDivisionError" in resp.text and resp.text.endswith("[exit code 1]")
        # A short limit for this call only: the others have time to spare on a busy host.
        code.settings = code.settings.model_copy(update={"timeout": 1.0})
        resp, _, metrics = await call_tool(
            code, json.dumps({"code": "import time; time.sleep(30)"}), agent, {}
        )
        assert resp.text.endswith("[timed out after 1s]") and metrics["timed_out"]
        await code.aclose()
        await tools["bash"].aclose()
        assert _verl_sandboxes(api) == []

    asyncio.run(scenario())


def test_bad_config_is_refused():
    from rock_serve.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        VerlSandboxTool({"kind": "cobol"})
    with pytest.raises(InvalidRequest):
        VerlSandboxTool({"nonsense": 1})


def test_the_example_runs(api, platform):
    import os
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[2] / "examples" / "verl_tool_loop.py"
    env = {**os.environ, "ROCK_BASE_URL": platform.url}
    done = subprocess.run(
        [sys.executable, str(example)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "$ cat note.txt\nhello\n" in done.stdout
    assert "reward: 1.0" in done.stdout
    assert "run_code: Success, stdout '6\\n'" in done.stdout
    assert api.get("/v1/sandboxes").json()["items"] == []
