"""PPO (RLlib's new API stack) on a sandbox-backed env, run as a Ray job on the platform's cluster.

The env (``rock_serve.envs.integrations.rllib_env_creator``) has numeric spaces: a Discrete menu
of shell commands (``touch f<k>``, ``rm -f f<k>``) and a Box observation read from the
sandbox's files. RLlib's env runners create it inside Ray, so its sandbox comes from the
platform over the Ray transport (no HTTP). Every iteration prints one ``ITERATION {json}`` line;
the sandboxes are deleted when the algorithm stops (and reaped with the job if it dies).

    rock up
    ray job submit --address http://127.0.0.1:8265 --working-dir examples -- python rllib_ppo.py

Kept tiny for a 2-core machine: one env runner with half a CPU, a local learner, 128 env steps
per iteration.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import ray
from ray.rllib.algorithms.ppo import PPOConfig
from ray.tune.registry import register_env

from rock_serve.envs.integrations import rllib_env_creator

ENV_NAME = "rock-file-flags"


def config(namespace: str, env_runners: int, batch: int) -> PPOConfig:
    """A small PPO config on the sandbox env."""
    return (
        PPOConfig()
        .environment(
            ENV_NAME,
            env_config={"namespace": namespace, "slots": 3, "max_episode_steps": 8},
        )
        .env_runners(
            num_env_runners=env_runners,
            num_envs_per_env_runner=1,
            num_cpus_per_env_runner=0.5,
            rollout_fragment_length="auto",
            # With remote runners, the driver needs no env (and no sandbox) of its own.
            create_local_env_runner=env_runners == 0,
        )
        .learners(num_learners=0)
        .training(
            train_batch_size_per_learner=batch,
            minibatch_size=min(64, batch),
            num_epochs=2,
            lr=3e-4,
        )
        .debugging(seed=0)
    )


def _metrics(result: dict[str, Any]) -> dict[str, Any]:
    runners = result.get("env_runners", {})
    learner = result.get("learners", {}).get("default_policy", {})
    return {
        "iteration": result.get("training_iteration"),
        "env_steps": runners.get("num_env_steps_sampled_lifetime"),
        "episodes": runners.get("num_episodes_lifetime"),
        "episode_return_mean": runners.get("episode_return_mean"),
        "total_loss": learner.get("total_loss"),
    }


def _sandboxes(runner: Any) -> list[dict[str, Any]]:
    """Each env of an env runner: its sandbox and the SDK client's transport."""
    envs = getattr(runner.env.unwrapped, "envs", [])
    return [
        {
            "sandbox": env.unwrapped.sandbox_id,
            "client": type(env.unwrapped.client._transport).__name__,
        }
        for env in envs
    ]


def main() -> None:
    """Train for ``--iterations`` iterations and print each one's metrics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", default="rock-serve", help="The platform's Ray namespace.")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--env-runners", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128, help="Env steps per iteration.")
    args = parser.parse_args()

    ray.init()  # in `ray job submit`, RAY_ADDRESS names the job's cluster
    register_env(ENV_NAME, rllib_env_creator)
    algo = config(args.namespace, args.env_runners, args.batch).build_algo()
    try:
        for _ in range(args.iterations):
            started = time.perf_counter()
            metrics = _metrics(algo.train())
            metrics["seconds"] = round(time.perf_counter() - started, 2)
            print("ITERATION " + json.dumps(metrics), flush=True)
        runners = algo.env_runner_group.foreach_env_runner(_sandboxes, local_env_runner=False)
        print("SANDBOXES " + json.dumps([env for envs in runners for env in envs]), flush=True)
    finally:
        algo.stop()  # closes every env runner's envs: their sandboxes are deleted
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
