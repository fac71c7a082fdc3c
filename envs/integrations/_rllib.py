"""A sandbox-backed env with numeric spaces, for RLlib.

RLlib's default models cannot encode ``Text`` spaces, so :class:`FileFlagsCore` has a
``Discrete`` menu of shell actions and a ``Box`` observation computed from the sandbox's state.
The task: ``slots`` files ``f0``, ``f1``, ... may exist in the episode's directory; the agent
must make exactly a target subset of them exist. Action ``k < slots`` runs ``touch f<k>``,
action ``slots + k`` runs ``rm -f f<k>``. After every action a probe in the sandbox reads which
files exist; the observation is ``[exists_0..exists_{slots-1}, target_0..target_{slots-1},
last_exit_ok]`` (``float32`` in ``[0, 1]``). Reward 1.0 when the files match the target (which
ends the episode), ``-step_penalty`` otherwise. The start state and the target come from the
env's seeded generator and always differ.

:func:`rllib_env_creator` is the env creator for ``ray.tune.registry.register_env``: it drives
the core with a :class:`~rock_serve.envs.SandboxEnv` whose client talks to the platform over
the Ray transport (``Client.from_ray(namespace)``: RLlib's env runners run inside Ray, on the
platform's cluster), so no HTTP is involved. This module does not import Ray or RLlib.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Generator, Mapping
from typing import Any

import gymnasium
import numpy as np
from gymnasium.spaces import Box, Discrete

from rock_serve.envs import EnvCore, EpisodeContext, Op, Run, SandboxEnv, WriteFiles, output_text
from rock_serve.errors import InvalidRequest, RockError
from rock_serve.sdk import Client

__all__ = ["FileFlagsCore", "rllib_env_creator"]

Obs = np.ndarray[Any, np.dtype[np.float32]]


class FileFlagsCore(EnvCore[Obs, np.int64]):
    """Make exactly the target subset of ``slots`` files exist (see the module docstring)."""

    def __init__(self, *, slots: int = 3, step_penalty: float = 0.05) -> None:
        """Configure the task.

        Args:
            slots: Number of files (2 to 16); the action menu has ``2 * slots`` commands.
            step_penalty: Reward of a step that does not solve the task is ``-step_penalty``.
        """
        if not isinstance(slots, int) or not 2 <= slots <= 16:
            raise InvalidRequest(f"slots must be an int between 2 and 16, not {slots!r}")
        self.slots = slots
        self.step_penalty = float(step_penalty)
        self.observation_space = Box(0.0, 1.0, shape=(2 * slots + 1,), dtype=np.float32)
        self.action_space = Discrete(2 * slots)
        self.target = np.zeros(slots, dtype=np.int8)
        self._probe = (
            f"for i in $(seq 0 {slots - 1}); do "
            'if [ -e "f$i" ]; then printf 1; else printf 0; fi; done; echo'
        )

    def reset(self, ctx: EpisodeContext) -> Generator[Op, Any, tuple[Obs, dict[str, Any]]]:
        """Draw a start state and a different target; create the start state's files."""
        start = ctx.np_random.integers(0, 2, size=self.slots).astype(np.int8)
        target = ctx.np_random.integers(0, 2, size=self.slots).astype(np.int8)
        if np.array_equal(start, target):
            flip = int(ctx.np_random.integers(0, self.slots))
            target[flip] = 1 - target[flip]
        self.target = target
        files = {f"f{k}": "" for k in range(self.slots) if start[k]}
        if files:
            yield WriteFiles(files)
        result = yield Run(self._probe, timeout=10)
        exists = self._parse(output_text(result))
        info = {"target": _bits(target), "exists": _bits(exists)}
        return self._obs(exists, result.exit_code == 0), info

    def step(
        self, action: np.int64, ctx: EpisodeContext
    ) -> Generator[Op, Any, tuple[Obs, float, bool, bool, dict[str, Any]]]:
        """Run the chosen command, then read which files exist."""
        choice = int(action)
        slot = choice % self.slots
        command = f"touch f{slot}" if choice < self.slots else f"rm -f f{slot}"
        result = yield Run(f"{command}; ok=$?; {self._probe}; exit $ok", timeout=10)
        exists = self._parse(output_text(result))
        solved = bool(np.array_equal(exists, self.target))
        reward = 1.0 if solved else -self.step_penalty
        info = {"command": command, "exists": _bits(exists), "exit_code": result.exit_code}
        return self._obs(exists, result.exit_code == 0), reward, solved, False, info

    def sandbox_lost(self, error: RockError) -> Obs:
        """The observation ending an episode whose sandbox died: nothing exists."""
        return self._obs(np.zeros(self.slots, dtype=np.int8), False)

    def _parse(self, output: str) -> np.ndarray[Any, np.dtype[np.int8]]:
        lines = output.strip().splitlines()
        bits = lines[-1].strip() if lines else ""
        if len(bits) != self.slots or set(bits) - {"0", "1"}:
            raise InvalidRequest(f"unexpected probe output: {output[-200:]!r}")
        return np.array([int(b) for b in bits], dtype=np.int8)

    def _obs(self, exists: np.ndarray[Any, Any], ok: bool) -> Obs:
        return np.concatenate([exists, self.target, [1.0 if ok else 0.0]]).astype(np.float32)


def _bits(values: np.ndarray[Any, Any]) -> str:
    return "".join(str(int(v)) for v in values)


_CLIENTS: dict[tuple[str, str], Client] = {}
_CLIENTS_LOCK = threading.Lock()


def _client(config: Mapping[str, Any]) -> Client:
    """One client per process and platform (envs of a runner share it; never closed)."""
    transport = str(config.get("transport", "ray"))
    if transport == "ray":
        key = ("ray", str(config.get("namespace", "rock-serve")))
    elif transport == "http":
        key = ("http", str(config.get("base_url") or ""))
    else:
        raise InvalidRequest(f"transport must be 'ray' or 'http', not {transport!r}")
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            if transport == "ray":
                client = Client.from_ray(key[1])
            else:
                client = Client(key[1] or None, token=config.get("token"))
            _CLIENTS[key] = client
            atexit.register(client.close)
        return client


def rllib_env_creator(env_config: Mapping[str, Any]) -> gymnasium.Env[Obs, np.int64]:
    """Make a :class:`FileFlagsCore` env on the platform (``register_env``'s creator).

    ``env_config`` keys (RLlib passes an ``EnvContext``, a dict): ``namespace`` (the
    platform's Ray namespace, default ``rock-serve``), ``transport`` (``ray``, the default, or
    ``http`` with ``base_url`` and ``token``), ``slots``, ``step_penalty``,
    ``max_episode_steps`` (default 8), ``ttl_seconds`` (the sandbox's, default 3600). The
    sandbox is created at the first reset and deleted by ``close()`` (RLlib closes its envs
    when the algorithm stops) or garbage collection; a sandbox that dies ends the episode.
    """
    config = dict(env_config)
    core = FileFlagsCore(
        slots=int(config.get("slots", 3)), step_penalty=float(config.get("step_penalty", 0.05))
    )
    labels = {"rock-serve/integration": "rllib"}
    for key in ("worker_index", "vector_index"):
        value = getattr(env_config, key, None)
        if value is not None:
            labels[f"rock-serve/rllib-{key.replace('_', '-')}"] = str(value)
    return SandboxEnv(
        core,
        client=_client(config),
        sandbox={"ttl_seconds": float(config.get("ttl_seconds", 3600.0)), "labels": labels},
        max_episode_steps=int(config.get("max_episode_steps", 8)),
        on_sandbox_error="terminate",
    )
