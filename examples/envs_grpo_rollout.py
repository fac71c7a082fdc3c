"""A GRPO-style rollout: groups of envs on one task each, stepped concurrently, rewards scored.

Each group is ``SIZE`` copies of one seeded ``rock/CodeExec-v0`` problem (``make_group``), in
one shared sandbox per group (each member in a session and directory of its own); a toy policy
answers every member (right for some, wrong for others), all members of all groups run
concurrently, and the group-relative advantages are printed. Run after ``rock up`` (or
point ``ROCK_BASE_URL`` at any rock-serve API); inside the platform's Ray cluster the envs
use the Ray transport when no URL is set.
"""

import asyncio
import random

import numpy as np

import rock_serve.envs as envs

GROUPS, SIZE = 2, 4


def policy(problem, rng: random.Random) -> str:
    """Stands in for an LLM: the reference answer half of the time, a wrong one otherwise."""
    if rng.random() < 0.5:
        return f"```python\n{problem.solution}```"
    return "def solve(*args):\n    return None\n"


async def rollout(group: envs.AsyncEnvGroup, rng: random.Random) -> np.ndarray:
    """Play every member of a group to the end; its returns."""
    await group.reset()
    returns = np.zeros(group.num_envs)
    while not group.all_done:
        actions = [
            None if done else policy(env.unwrapped.core.problem, rng)
            for env, done in zip(group.envs, group.done, strict=True)
        ]
        _, rewards, *_ = await group.step(actions)
        returns += rewards
    return returns


async def main() -> None:
    """Roll out every group at once, then score them."""
    rng = random.Random(0)
    groups = [
        envs.make_group("rock/CodeExec-v0", seed=s, size=SIZE, shared_sandbox=True)
        for s in range(GROUPS)
    ]
    try:
        all_returns = await asyncio.gather(*(rollout(g, rng) for g in groups))
    finally:
        await asyncio.gather(*(g.close() for g in groups))
    for group, returns in zip(groups, all_returns, strict=True):
        advantages = (returns - returns.mean()) / (returns.std() + 1e-6)
        print(f"group seed={group.seed}: returns {returns.tolist()}", end=" ")
        print(f"advantages {advantages.round(2).tolist()}")


asyncio.run(main())
