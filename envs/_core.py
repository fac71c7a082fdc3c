"""What an env author writes: an :class:`EnvCore`, the I/O-free logic of a sandbox env.

A core's ``reset`` and ``step`` are generators. They ``yield`` operations on the env's sandbox
(:class:`Run`, :class:`Exec`, :class:`WriteFiles`, :class:`ReadFile`; :class:`LLMPoll` and
:class:`LLMRespond` for an agent's model calls) and receive each result
back, then ``return`` what Gymnasium's ``reset``/``step`` return. The same core is driven by the
sync :class:`~rock_serve.envs.SandboxEnv` (through :class:`~rock_serve.sdk.Client`) and by the
async :class:`~rock_serve.envs.AsyncSandboxEnv` (through :class:`~rock_serve.sdk.AsyncClient`),
so an env is written once for both. Paths and working directories are relative to the
episode's directory, which the driver empties at every reset.

Example::

    class Echo(EnvCore[str, str]):
        observation_space = UnicodeText(4096)
        action_space = UnicodeText(1024)

        def reset(self, ctx):
            yield WriteFiles({"hello.txt": "hi"})
            return "Run commands; say 'done' to stop.", {}

        def step(self, action, ctx):
            if action == "done":
                return "bye", 1.0, True, False, {}
            result = yield Run(action)
            return output_text(result), 0.0, False, False, {"exit_code": result.exit_code}
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeAlias, TypeVar

import numpy as np
from gymnasium import Space
from gymnasium.spaces import Text
from pydantic import ValidationError

from rock_serve.errors import InvalidRequest, RockError, from_validation
from rock_serve.protocol import CreateSandboxRequest, ExecResult, SessionRunResult

__all__ = [
    "EnvCore",
    "EpisodeContext",
    "Exec",
    "LLMPoll",
    "LLMRespond",
    "Op",
    "ReadFile",
    "Run",
    "WriteFiles",
    "output_text",
]

ObsT = TypeVar("ObsT")
ActT = TypeVar("ActT")


@dataclass(frozen=True)
class Run:
    """Run bash source in the env's persistent session; the result is a
    :class:`~rock_serve.protocol.SessionRunResult`.

    The session starts in the episode directory at the first ``Run`` of an episode and is
    closed (its processes killed) at the next reset. A command that ends the shell (``exit``)
    makes the next ``Run`` start a fresh one.
    """

    command: str
    timeout: float | None = 30.0
    max_output_bytes: int = 64 * 1024


@dataclass(frozen=True)
class Exec:
    """Run one command in a fresh process in the episode directory; the result is an
    :class:`~rock_serve.protocol.ExecResult`. A string is run with ``bash -c``, a list as argv.
    """

    command: str | list[str]
    stdin: str | None = None
    env: Mapping[str, str] | None = None
    timeout: float | None = 60.0
    max_output_bytes: int = 1 << 20


@dataclass(frozen=True)
class WriteFiles:
    """Write files (relative paths, parents created) in one round trip; the result is None."""

    files: Mapping[str, str | bytes]
    executable: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class ReadFile:
    """Read a file; the result is its bytes, or None when it is missing and ``missing_ok``."""

    path: str
    missing_ok: bool = False


@dataclass(frozen=True)
class LLMPoll:
    """Wait up to ``wait`` seconds for LLM calls of the agent in the sandbox (the sandbox's
    model service in relay mode, see docs/model-service.md); the result is a list of
    :class:`~rock_serve.protocol.llm.LLMCall`, empty when none came.
    """

    wait: float = 1.0
    max_calls: int = 1


@dataclass(frozen=True)
class LLMRespond:
    """Answer a polled LLM call with a chat.completion object (or fail it with ``error``);
    the result is None.
    """

    call_id: str
    response: dict[str, Any] | None = None
    error: str | None = None


#: An operation a core may yield.
Op: TypeAlias = Run | Exec | WriteFiles | ReadFile | LLMPoll | LLMRespond


@dataclass
class EpisodeContext:
    """What a core knows about the current episode; one per reset, passed to every step."""

    np_random: np.random.Generator
    """The env's random generator (seeded by ``reset(seed=...)``): draw tasks from it."""
    seed: int | None
    """The seed given to this reset, if any."""
    options: dict[str, Any]
    """The options given to this reset (``{}`` when none)."""
    max_episode_steps: int | None
    """The time limit the env runs under, if any."""
    step: int = 0
    """Steps taken so far in this episode (0 during the first step)."""

    @property
    def last_step(self) -> bool:
        """Whether the step being taken is the last one the time limit allows."""
        return self.max_episode_steps is not None and self.step + 1 >= self.max_episode_steps


def output_text(result: SessionRunResult | ExecResult) -> str:
    """The output of a :class:`Run` (or stdout then stderr of an :class:`Exec`) as text;
    bytes that are not UTF-8 become U+FFFD.
    """
    if isinstance(result, SessionRunResult):
        return result.output_bytes().decode("utf-8", "replace")
    return (result.stdout_bytes() + result.stderr_bytes()).decode("utf-8", "replace")


ResetGen: TypeAlias = Generator[Op, Any, tuple[Any, dict[str, Any]]]
StepGen: TypeAlias = Generator[Op, Any, tuple[Any, float, bool, bool, dict[str, Any]]]


class EnvCore(Generic[ObsT, ActT]):
    """The logic of a sandbox env, free of I/O (see the module docstring).

    Subclasses set :attr:`observation_space` and :attr:`action_space` (class or instance
    attributes) and implement :meth:`reset` and :meth:`step` as generators. Their ``__init__``
    keyword arguments are the env's ``make`` kwargs.
    """

    observation_space: Space[ObsT]
    action_space: Space[ActT]
    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}
    uses_sandbox: bool = True
    """False for cores that never yield an operation: no sandbox is ever created for them."""
    sandbox_defaults: ClassVar[Mapping[str, Any]] = {}
    """Fields of :class:`~rock_serve.protocol.CreateSandboxRequest` this env wants by default
    (its spec's ``image`` and the ``sandbox=`` kwarg of ``make`` override them)."""

    def reset(self, ctx: EpisodeContext) -> Generator[Op, Any, tuple[ObsT, dict[str, Any]]]:
        """Start an episode: set the task up in the sandbox; return ``(observation, info)``."""
        raise NotImplementedError

    def step(
        self, action: ActT, ctx: EpisodeContext
    ) -> Generator[Op, Any, tuple[ObsT, float, bool, bool, dict[str, Any]]]:
        """Apply ``action``; return ``(observation, reward, terminated, truncated, info)``."""
        raise NotImplementedError

    def sandbox_lost(self, error: RockError) -> ObsT:
        """The observation that ends an episode whose sandbox died (``on_sandbox_error=
        "terminate"``). The default suits text observation spaces.
        """
        if isinstance(self.observation_space, Text):
            message = f"[the sandbox was lost: {error.code.value}: {error.message}]"
            return message[: self.observation_space.max_length]  # type: ignore[return-value]
        raise InvalidRequest(
            f"{type(self).__name__} has no text observations: on_sandbox_error='terminate' "
            "needs a sandbox_lost() override"
        )


def sandbox_request(
    core: EnvCore[Any, Any],
    image: str | None,
    overrides: CreateSandboxRequest | Mapping[str, Any] | None,
    labels: Mapping[str, str],
) -> CreateSandboxRequest:
    """The create request of a core's sandbox: its defaults, the spec's image, then overrides."""
    fields: dict[str, Any] = dict(core.sandbox_defaults)
    if image is not None:
        fields["image"] = image
    if isinstance(overrides, CreateSandboxRequest):
        fields.update(overrides.model_dump(exclude_unset=True))
    elif overrides is not None:
        fields.update(overrides)
    fields["labels"] = {**fields.get("labels", {}), **labels}
    try:
        return CreateSandboxRequest.model_validate(fields)
    except ValidationError as exc:
        error = from_validation(exc.errors())  # a malformed image: invalid_image_reference
        raise type(error)(f"bad sandbox settings: {error.message}") from None
    except ValueError as exc:
        raise InvalidRequest(f"bad sandbox settings: {exc}") from None
