"""rock_serve.envs: Gymnasium environments whose actions run in rock-serve sandboxes.

Sync envs follow Gymnasium's API (``reset(*, seed, options) -> (obs, info)``, ``step(action)
-> (obs, reward, terminated, truncated, info)``, ``close()``); :class:`AsyncEnv` is the same
with ``await``. :func:`make` and :func:`make_async` build registered envs (the spec's kwargs,
overridden by yours, reach the env) wrapped in the spec's time limit and order enforcing. Each
env owns a sandbox, created at its first reset and deleted by ``close()`` or garbage
collection. :mod:`rock_serve.envs.vector` steps many envs concurrently and makes GRPO groups.

Built-in envs (registered on import): ``rock/Terminal-v0``, ``rock/CodeExec-v0``,
``rock/GuessNumber-v0``. Write your own as an :class:`EnvCore` (see :mod:`._core`) and
:func:`register` it.

Example::

    import rock_serve.envs as envs

    with envs.make("rock/Terminal-v0", family="count_lines") as env:
        obs, info = env.reset(seed=1)
        obs, reward, terminated, truncated, info = env.step("wc -l logs/app.log")
"""

from gymnasium import Env

from rock_serve.envs import builtin  # noqa: E402,F401  (registers the built-in envs)
from rock_serve.envs._async_env import AsyncEnv, AsyncSandboxEnv, AsyncWrapper
from rock_serve.envs._checker import check_async_env, check_env
from rock_serve.envs._core import (
    EnvCore,
    EpisodeContext,
    Exec,
    LLMPoll,
    LLMRespond,
    Op,
    ReadFile,
    Run,
    WriteFiles,
    output_text,
)
from rock_serve.envs._env import SandboxEnv
from rock_serve.envs._errors import (
    EnvClosed,
    EnvExists,
    EnvNotFound,
    EpisodeOver,
    InvalidAction,
    InvalidEnvKwargs,
    ResetNeeded,
)
from rock_serve.envs._registry import (
    EnvSpec,
    list_envs,
    make,
    make_async,
    register,
    spec,
    unregister,
)
from rock_serve.envs._spaces import UnicodeText
from rock_serve.envs._wrappers import AsyncOrderEnforcing, AsyncTimeLimit, OrderEnforcing
from rock_serve.envs.vector import AsyncEnvGroup, AsyncVectorEnv, make_group, make_vec

__all__ = [
    "AsyncEnv",
    "AsyncEnvGroup",
    "AsyncOrderEnforcing",
    "AsyncSandboxEnv",
    "AsyncTimeLimit",
    "AsyncVectorEnv",
    "AsyncWrapper",
    "Env",
    "EnvClosed",
    "EnvCore",
    "EnvExists",
    "EnvNotFound",
    "EnvSpec",
    "EpisodeContext",
    "EpisodeOver",
    "Exec",
    "InvalidAction",
    "InvalidEnvKwargs",
    "Op",
    "OrderEnforcing",
    "LLMPoll",
    "LLMRespond",
    "ReadFile",
    "ResetNeeded",
    "Run",
    "SandboxEnv",
    "UnicodeText",
    "WriteFiles",
    "check_async_env",
    "check_env",
    "list_envs",
    "make",
    "make_async",
    "make_group",
    "make_vec",
    "output_text",
    "register",
    "spec",
    "unregister",
]
