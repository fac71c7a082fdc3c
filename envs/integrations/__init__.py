"""rock_serve.envs.integrations: trainer-side adapters that run tools in our sandboxes.

- **verl**: :class:`VerlSandboxTool`, a tool with verl's ``BaseTool`` shape whose sandbox lives
  for a trajectory (keyed by verl's request id, bounded by an idle reaper and a TTL); list it in
  verl's ``tool_config.yaml`` as ``rock_serve.envs.integrations.VerlSandboxTool``.
- **SandboxFusion**: :func:`run_code` and its models, the contract of SandboxFusion's
  ``POST /run_code`` (the Admin serves it, so verl's code-reward path only changes its URL).
- **GEM**: :class:`GemPythonTool` and :class:`GemBashTool` for GEM's ``ToolEnvWrapper``;
  :class:`GemEnvClient`, a ``gem.Env`` playing an env through the Admin's GEM routes (ROCK's
  ``/apis/v1/envs/gem/*``, whose models are here too).
- **SkyRL**: :class:`SkyRLEnv` (one of our envs) and :class:`SkyRLSandboxEnv` (a bare
  sandbox), SkyRL text envs safe to call from SkyRL's thread pool
  (:func:`thread_local_client`); loaded on first use, as they subclass SkyRL's base class when
  skyrl-gym is installed.
- **RLlib**: :class:`FileFlagsCore`, a sandbox env with numeric spaces, and
  :func:`rllib_env_creator` for ``ray.tune.registry.register_env``.

None of them imports verl, GEM, SkyRL or Ray (the SkyRL classes import skyrl-gym if present).
"""

import importlib
from typing import Any

from rock_serve.envs.integrations._gem import GemBashTool, GemPythonTool, GemSandboxTool
from rock_serve.envs.integrations._gem_env import (
    GEM_PREFIX,
    GemCloseRequest,
    GemCloseResponse,
    GemEnvClient,
    GemListRequest,
    GemListResponse,
    GemMakeRequest,
    GemMakeResponse,
    GemResetRequest,
    GemResetResponse,
    GemStepRequest,
    GemStepResponse,
    gem_make,
)
from rock_serve.envs.integrations._rllib import FileFlagsCore, rllib_env_creator
from rock_serve.envs.integrations._sandbox_fusion import (
    LANGUAGES,
    SUPPORTED_LANGUAGES,
    CommandRunResult,
    CommandRunStatus,
    Language,
    RunCodeRequest,
    RunCodeResponse,
    RunStatus,
    run_code,
)
from rock_serve.envs.integrations._verl import (
    OpenAIFunctionToolSchema,
    ToolResponse,
    VerlSandboxTool,
    VerlToolConfig,
)

#: Names loaded on first use, and their modules.
_LAZY = {
    "PerThreadTransport": "_skyrl",
    "SkyRLEnv": "_skyrl",
    "SkyRLSandboxEnv": "_skyrl",
    "TextEnvStepOutput": "_skyrl",
    "thread_local_client": "_skyrl",
    "thread_transport": "_skyrl",
}

__all__ = [
    "GEM_PREFIX",
    "LANGUAGES",
    "SUPPORTED_LANGUAGES",
    "CommandRunResult",
    "CommandRunStatus",
    "FileFlagsCore",
    "GemBashTool",
    "GemCloseRequest",
    "GemCloseResponse",
    "GemEnvClient",
    "GemListRequest",
    "GemListResponse",
    "GemMakeRequest",
    "GemMakeResponse",
    "GemPythonTool",
    "GemResetRequest",
    "GemResetResponse",
    "GemSandboxTool",
    "GemStepRequest",
    "GemStepResponse",
    "Language",
    "OpenAIFunctionToolSchema",
    "PerThreadTransport",
    "RunCodeRequest",
    "RunCodeResponse",
    "RunStatus",
    "SkyRLEnv",
    "SkyRLSandboxEnv",
    "TextEnvStepOutput",
    "ToolResponse",
    "VerlSandboxTool",
    "VerlToolConfig",
    "gem_make",
    "rllib_env_creator",
    "run_code",
    "thread_local_client",
    "thread_transport",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
