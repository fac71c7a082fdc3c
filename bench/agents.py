"""Benchmark: a full mini-swe-agent episode in a bwrap sandbox with the scripted policy, its
LLM calls through the platform's model service (relay mode: the trainer answers with sb.llm).

Usage: ``.venv/bin/python bench/agents.py [--episodes 5] [--quick]``

Needs the ``agent-mini`` image (``scripts/build-agent-images``). It starts its own platform
(bench/_harness.py: local Ray with its own temp dir, Serve on a free loopback port) on the
bwrap runtime, then runs N episodes of the built-in ``fix_add`` task (3 LLM calls answered by
the solving script), each in a fresh sandbox, and prints p50/p99 of:

- sandbox create (image ``agent-mini``; the first one also unpacks the image);
- launch -> first LLM call (write the task, start mini-swe-agent as a background process, its
  imports, its first request through the sandbox's model service to the trainer's poll);
- one LLM call round trip as the trainer sees it (answer sent -> the agent's next call, which
  includes the agent running one bash command);
- agent exit -> verifier verdict; the whole episode (create -> verdict).

Floors measured in the same run and sandboxes: a one-shot ``python3 -c pass`` exec (the
platform's round trip), ``python3 -c "import minisweagent.run.mini, litellm"`` (what
mini-swe-agent's start costs by itself), and the scripted floor: the task's solution commands
and its verifier run as plain execs in a fresh copy of the repository, no agent and no model
service (the least an episode can cost); the ratios say how far each phase is from its floor.
Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import _harness as harness  # noqa: E402

from rock_serve.agents import (  # noqa: E402
    AGENT_IMAGE,
    ScriptedPolicy,
    builtin_task,
    solution_replies,
    start_agent,
)
from rock_serve.sdk import AsyncClient  # noqa: E402

IMPORTS = "import minisweagent.run.mini, litellm"
ENV = {"MSWEA_SILENT_STARTUP": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


async def episode(client: AsyncClient, samples: dict[str, list[float]]) -> None:
    """One episode in a fresh sandbox; its phase times go into ``samples``."""
    task = builtin_task("fix_add")
    policy = ScriptedPolicy(solution_replies(task))
    t0 = time.perf_counter()
    async with client.sandbox(image=AGENT_IMAGE, model_service={"mode": "relay"}) as sb:
        t1 = time.perf_counter()
        samples["create"].append(t1 - t0)
        run = await start_agent(sb, task, timeout=600)
        mark = time.perf_counter()
        first = True
        async for call in run.calls():
            now = time.perf_counter()
            samples["first_call" if first else "call_round_trip"].append(now - mark)
            first = False
            await call.respond(policy(call.request))
            mark = time.perf_counter()
        reward, _ = await run.verify()
        t2 = time.perf_counter()
        samples["exit_to_verdict"].append(t2 - mark)
        samples["episode"].append(t2 - t0)
        assert reward == 1.0 and run.exit_code == 0, (reward, run.exit_code)
        for _ in range(3):
            s = time.perf_counter()
            await sb.exec(["python3", "-c", "pass"])
            samples["floor_exec"].append(time.perf_counter() - s)
        s = time.perf_counter()
        result = await sb.exec(["python3", "-c", IMPORTS], env=ENV, timeout=300)
        assert result.exit_code == 0, result.stderr
        samples["floor_imports"].append(time.perf_counter() - s)
        s = time.perf_counter()
        await sb.files.mkdir("/tmp/floor")
        for path, content in task.files.items():
            await sb.files.write(f"/tmp/floor/{path}", content)
        for command in task.solution:
            await sb.exec(["bash", "-c", command], cwd="/tmp/floor")
        result = await sb.exec(["python3", "-c", task.verifier], cwd="/tmp/floor")
        assert result.exit_code == 0, result.stderr
        samples["floor_scripted"].append(time.perf_counter() - s)


async def measure(url: str, episodes: int) -> dict[str, list[float]]:
    """Run the episodes one after another."""
    names = ["create", "first_call", "call_round_trip", "exit_to_verdict", "episode"]
    samples: dict[str, list[float]] = {
        k: [] for k in names + ["floor_exec", "floor_imports", "floor_scripted"]
    }
    async with AsyncClient(url, timeout=600) as client:
        for _ in range(episodes):
            await episode(client, samples)
    return samples


def main() -> None:
    """Parse arguments, run, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="two episodes")
    args = parser.parse_args()
    episodes = 2 if args.quick else args.episodes
    state = tempfile.mkdtemp(prefix="rsbench-agents-")
    app = {
        "runtime": harness.runtime_config("bwrap", state),
        "namespace": "rock-bench-agents",
        "auth": {"mode": "disabled"},
    }
    with harness.platform({"/": app}) as urls:
        samples = asyncio.run(measure(urls["/"], episodes))
    floor_exec = harness.pct(samples["floor_exec"], 50)
    floor_imports = harness.pct(samples["floor_imports"], 50)
    floor_scripted = harness.pct(samples["floor_scripted"], 50)
    print(
        "mini-swe-agent episode (fix_add, 3 LLM calls, scripted policy, model service relay), "
        f"bwrap, n={episodes}"
    )
    print(f"{'phase':<28}{'p50 ms':>10}{'p99 ms':>10}  ratio to floor (p50)")
    floors = {
        "first_call": ("imports", floor_imports),
        "call_round_trip": ("exec", floor_exec),
        "exit_to_verdict": ("exec", floor_exec),
        "episode": ("scripted", floor_scripted),
    }
    for name, xs in samples.items():
        p50, p99 = harness.pct(xs, 50) * 1000, harness.pct(xs, 99) * 1000
        ratio = ""
        if name in floors and floors[name][1] > 0:
            ratio = f"{p50 / 1000 / floors[name][1]:.1f}x {floors[name][0]}"
            if name == "episode":
                ratio += f", {p50 / 1000 / floor_imports:.1f}x imports"
        print(f"{name:<28}{p50:>10.1f}{p99:>10.1f}  {ratio}")


if __name__ == "__main__":
    main()
