"""verl on rock-serve: the sandbox tool as verl's tool agent loop calls it, and a code reward
through the SandboxFusion-compatible ``/run_code``.

    rock up
    python examples/verl_tool_loop.py        # ROCK_BASE_URL, default http://127.0.0.1:8000

In a verl run, the tool comes from ``examples/verl_tool_config.yaml``
(``actor_rollout_ref.rollout.multi_turn.tool_config_path``) and the code reward from
``reward.sandbox_fusion.url=http://127.0.0.1:8000/run_code``: verl needs no other change.
"""

from __future__ import annotations

import asyncio
import os

import httpx

from rock_serve.envs.integrations import VerlSandboxTool


class AgentData:
    """What verl hands a tool as ``agent_data``: its request id keys the trajectory."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id


async def rollout(url: str) -> float:
    """One trajectory of bash calls, then its reward from the verifier."""
    tool = VerlSandboxTool(
        {"base_url": url, "kind": "bash", "reward_command": "test -f solved && echo 1 || echo 0"}
    )
    agent = AgentData("demo-trajectory")
    try:
        for command in ("mkdir -p work && cd work", "echo hello > note.txt", "cat note.txt"):
            # verl: a fresh instance per call, released in `finally`; the sandbox persists.
            instance_id, _ = await tool.create(create_kwargs={})
            try:
                response, _, metrics = await tool.execute(
                    instance_id, {"command": command}, agent_data=agent
                )
            finally:
                await tool.release(instance_id)
            print(f"$ {command}\n{response.text}", end="")
            print(f"  [exit {metrics['exit_code']} in {metrics['duration'] * 1000:.0f} ms]")
        instance_id, _ = await tool.create()
        await tool.execute(instance_id, {"command": "touch ../solved"}, agent_data=agent)
        reward = await tool.calc_reward(instance_id, agent_data=agent)
        await tool.release(instance_id)
        print(f"reward: {reward}")
        return reward
    finally:
        await tool.aclose()  # deletes the trajectory's sandbox


def code_reward(url: str) -> str:
    """The body verl's sandbox_fusion reward posts, and the status it reads."""
    body = {
        "code": "import sys\nprint(sum(map(int, sys.stdin.read().split())))",
        "stdin": "1 2 3",
        "language": "python",
        "compile_timeout": 10,
        "run_timeout": 10,
        "memory_limit_MB": 1024,
        "files": {},
        "fetch_files": [],
    }
    reply = httpx.post(f"{url}/run_code", json=body, timeout=60).json()
    print(f"run_code: {reply['status']}, stdout {reply['run_result']['stdout']!r}")
    return str(reply["status"])


if __name__ == "__main__":
    base_url = os.environ.get("ROCK_BASE_URL", "http://127.0.0.1:8000")
    asyncio.run(rollout(base_url))
    code_reward(base_url)
