"""A verl tool whose commands run in rock-serve sandboxes.

:class:`VerlSandboxTool` has the shape of verl's ``verl.tools.base_tool.BaseTool`` (verl 0.9.1):
``__init__(config, tool_schema)``, ``get_openai_tool_schema()``, and the coroutines
``create(instance_id=None, **kwargs) -> (instance_id, ToolResponse)``,
``execute(instance_id, parameters, **kwargs) -> (ToolResponse, reward, metrics)``,
``calc_reward(instance_id, **kwargs) -> float`` and ``release(instance_id, **kwargs)``. verl is
not imported unless installed: when it is, its own ``ToolResponse`` and schema classes are used;
otherwise look-alike pydantic models with the same fields. List the tool in verl's
``tool_config.yaml`` (see ``examples/verl_tool_config.yaml``)::

    tools:
      - class_name: rock_serve.envs.integrations.VerlSandboxTool
        config: {type: native, base_url: "http://127.0.0.1:8000", kind: bash, timeout: 30}

**Lifetimes.** verl's ``tool_agent`` loop creates and releases an instance around *every* tool
call (``create -> execute(agent_data=...) -> release``), so the sandbox cannot live in the
instance. It lives in a *trajectory* keyed by ``agent_data.request_id`` (constant for one
rollout): the first call creates it, later calls of the same request reuse it (a bash session's
cwd and variables persist), and releasing a per-call instance leaves it alone. Nothing tells a
tool that a trajectory ended, so trajectories are bounded twice: an idle reaper in the tool
deletes sandboxes unused for ``idle_ttl_seconds``, and every sandbox carries a server-side TTL
(``ttl_seconds``) that holds even if the trainer dies. :meth:`VerlSandboxTool.release_trajectory`
ends one early. Without a request id (verl's older multi-turn rollout, or a custom loop) the
instance is the trajectory: ``create -> execute ... -> calc_reward -> release`` and ``release``
deletes the sandbox.

**Config keys** (the ``config:`` block): ``base_url``/``token`` (default ``ROCK_BASE_URL`` and
``ROCK_TOKEN``), ``transport`` (``http`` or ``ray``, with ``namespace``, for trainers on the
platform's own Ray cluster), ``kind`` (``bash``: the ``command`` argument runs in a persistent
session; ``python``: the ``code`` argument runs as a fresh ``python3`` process), ``image``,
``timeout`` (seconds per call), ``ttl_seconds``, ``idle_ttl_seconds``, ``reap_interval_seconds``,
``max_output_chars`` (the tail is kept: verl cuts tool text to 256 characters by default, so the
exit status is written last), ``reward_command`` (run by ``calc_reward``), ``setup_commands``,
``env``, ``owner``. Per-sample ``create_kwargs`` may give ``setup_commands``, ``files``
(path -> text) and ``reward_command``; they apply when the trajectory's sandbox is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rock_serve.errors import (
    InvalidRequest,
    NotFound,
    RockError,
    RockletUnavailable,
    SandboxFailed,
    SandboxNotFound,
    SandboxNotRunning,
    SessionExists,
    SessionNotFound,
)
from rock_serve.protocol import CreateSandboxRequest
from rock_serve.runtime._sync import run_sync
from rock_serve.sdk import AsyncClient

__all__ = [
    "OpenAIFunctionToolSchema",
    "ToolResponse",
    "VerlSandboxTool",
    "VerlToolConfig",
]

log = logging.getLogger("rock_serve.envs.integrations")

#: The bash session a bash-kind tool runs its commands in.
SESSION = "verl"


# ----------------------------------------------------------------------------- verl's models


class ToolResponse(BaseModel):
    """Look-alike of ``verl.tools.schemas.ToolResponse`` (used when verl is not installed)."""

    text: str | None = None
    image: list[Any] | None = None
    video: list[Any] | None = None


class OpenAIFunctionPropertySchema(BaseModel):
    """One parameter of a function tool (OpenAI format)."""

    type: str | list[str]
    description: str | None = None
    enum: list[Any] | None = None


class OpenAIFunctionParametersSchema(BaseModel):
    """The parameters object of a function tool."""

    type: str
    properties: dict[str, OpenAIFunctionPropertySchema]
    required: list[str] = Field(default_factory=list)


class OpenAIFunctionSchema(BaseModel):
    """A function tool's name, description and parameters."""

    name: str
    description: str
    parameters: OpenAIFunctionParametersSchema = Field(
        default_factory=lambda: OpenAIFunctionParametersSchema(type="object", properties={})
    )
    strict: bool = False


class OpenAIFunctionToolSchema(BaseModel):
    """Look-alike of ``verl.tools.schemas.OpenAIFunctionToolSchema``."""

    type: str
    function: OpenAIFunctionSchema


def _verl_class(name: str, fallback: type[BaseModel]) -> type[BaseModel]:
    """The schema class of verl when verl is installed, else the look-alike."""
    try:
        from verl.tools import schemas  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return fallback
    cls: type[BaseModel] = getattr(schemas, name, fallback)
    return cls


_DEFAULT_SCHEMAS: dict[str, dict[str, Any]] = {
    "bash": {
        "type": "function",
        "function": {
            "name": "bash",
            "description": "Run a bash command in the sandbox. The shell persists between "
            "calls (cwd, variables). Returns the output, then the exit code if non-zero.",
            "parameters": {
                "type": "object",
                "properties": {"command": {"type": "string", "description": "Bash source."}},
                "required": ["command"],
            },
        },
    },
    "python": {
        "type": "function",
        "function": {
            "name": "code_interpreter",
            "description": "Run a Python 3 program in the sandbox and return what it prints. "
            "Each call is a fresh process; files persist between calls.",
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string", "description": "The program."}},
                "required": ["code"],
            },
        },
    },
}


# ----------------------------------------------------------------------------- config


class VerlToolConfig(BaseModel):
    """The ``config:`` block of the tool in verl's tool config (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    type: Literal["native"] = Field(default="native", description="verl's tool type.")
    base_url: str | None = Field(default=None, description="Platform URL (``ROCK_BASE_URL``).")
    token: str | None = Field(default=None, description="Bearer token (``ROCK_TOKEN``).")
    transport: Literal["http", "ray"] = Field(
        default="http", description="``ray``: call the platform's actors (same Ray cluster)."
    )
    namespace: str = Field(default="rock-serve", description="Platform's Ray namespace.")
    kind: Literal["bash", "python"] = Field(default="bash", description="What a call runs.")
    image: str | None = Field(default=None, description="Sandbox image (None: runtime default).")
    timeout: float = Field(default=30.0, gt=0, le=86_400, description="Seconds per call.")
    ttl_seconds: float = Field(
        default=3600.0, gt=0, description="Server-side hard deadline of each sandbox."
    )
    idle_ttl_seconds: float = Field(
        default=600.0, gt=0, description="The tool deletes sandboxes unused this long."
    )
    reap_interval_seconds: float = Field(
        default=30.0, gt=0, description="How often the tool looks for idle sandboxes."
    )
    max_output_chars: int = Field(
        default=8192, ge=64, description="Output kept per call (the tail)."
    )
    reward_command: str | None = Field(
        default=None,
        description="Verifier run by calc_reward: its last stdout line as a float, else 1.0 "
        "on exit 0 and 0.0 otherwise.",
    )
    setup_commands: list[str] = Field(
        default_factory=list, description="Run once in each new sandbox."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Sandbox environment.")
    owner: str = Field(default="verl", description="Owner recorded on the sandboxes.")


# ----------------------------------------------------------------------------- state


@dataclass
class _Trajectory:
    key: str
    owned_by: str | None  # the instance whose release deletes it (None: request-keyed)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sandbox_id: str | None = None
    session: bool = False
    create_kwargs: dict[str, Any] = field(default_factory=dict)
    last_used: float = 0.0
    calls: int = 0


@dataclass
class _Instance:
    id: str
    create_kwargs: dict[str, Any]
    key: str | None = None


def _request_id(kwargs: Mapping[str, Any]) -> str | None:
    agent_data = kwargs.get("agent_data")
    rid = getattr(agent_data, "request_id", None) if agent_data is not None else None
    rid = rid or kwargs.get("request_id")
    return str(rid) if rid else None


def _label(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", value)[:63]


def parse_reward(stdout: str, exit_code: int) -> float:
    """The reward a verifier reports: its last stdout line as a float, else by exit code."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if lines:
        with contextlib.suppress(ValueError):
            return float(lines[-1])
    return 1.0 if exit_code == 0 else 0.0


class VerlSandboxTool:
    """verl ``BaseTool``-shaped tool that runs bash or Python in per-trajectory sandboxes."""

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        tool_schema: Any = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Build the tool (no I/O: the client and the reaper start on first use).

        Args:
            config: The ``config:`` block of verl's tool config (see :class:`VerlToolConfig`).
            tool_schema: verl's ``OpenAIFunctionToolSchema`` (or its plain data); None for the
                default schema of ``kind``.
            clock: Monotonic clock of the idle reaper.

        Raises:
            InvalidRequest: a bad config.
        """
        raw = dict(config or {})
        try:
            self.settings = VerlToolConfig.model_validate(raw)
        except ValueError as exc:
            raise InvalidRequest(f"bad verl tool config: {exc}") from None
        self.config = raw
        schema_cls = _verl_class("OpenAIFunctionToolSchema", OpenAIFunctionToolSchema)
        if tool_schema is None:
            tool_schema = _DEFAULT_SCHEMAS[self.settings.kind]
        if isinstance(tool_schema, Mapping):
            tool_schema = schema_cls.model_validate(dict(tool_schema))
        self.tool_schema = tool_schema
        self.name: str = tool_schema.function.name
        self._response_cls = _verl_class("ToolResponse", ToolResponse)
        self._clock = clock
        self._client: AsyncClient | None = None
        self._client_lock = asyncio.Lock()
        self._instances: dict[str, _Instance] = {}
        self._trajectories: dict[str, _Trajectory] = {}
        self._reaper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ verl's BaseTool API

    def get_openai_tool_schema(self) -> Any:
        """The tool's schema (verl's ``OpenAIFunctionToolSchema`` shape)."""
        return self.tool_schema

    async def create(self, instance_id: str | None = None, **kwargs: Any) -> tuple[str, Any]:
        """Register a tool instance (cheap: no sandbox yet).

        Args:
            instance_id: An id to use; None for a fresh one.
            **kwargs: ``create_kwargs`` (a dict: ``setup_commands``, ``files``,
                ``reward_command``), as verl's agent loop passes them.

        Returns:
            The instance id and an empty response.
        """
        iid = instance_id or str(uuid.uuid4())
        create_kwargs = kwargs.get("create_kwargs")
        merged = dict(create_kwargs) if isinstance(create_kwargs, Mapping) else {}
        self._instances[iid] = _Instance(iid, merged)
        self._ensure_reaper()
        return iid, self._response("")

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs: Any
    ) -> tuple[Any, float, dict[str, Any]]:
        """Run one call in the trajectory's sandbox (created on its first call).

        Args:
            instance_id: From :meth:`create`.
            parameters: The tool call's arguments (``command`` for bash, ``code`` for python).
            **kwargs: ``agent_data`` (its ``request_id`` keys the trajectory) or ``request_id``.

        Returns:
            The response (output tail, then ``[exit code N]`` or ``[timed out ...]``), a step
            reward of 0.0, and metrics (exit code, duration, sandbox id, ...).

        Raises:
            NotFound: unknown instance id.
        """
        arg = "command" if self.settings.kind == "bash" else "code"
        source = parameters.get(arg)
        if not isinstance(source, str) or not source.strip():
            return self._response(f"Error: the '{arg}' argument (a string) is required."), 0.0, {}
        trajectory = self._trajectory(instance_id, kwargs)
        async with trajectory.lock, self._losing(trajectory):
            sandbox_id = await self._sandbox(trajectory)
            client = await self._platform()
            if self.settings.kind == "bash":
                if not trajectory.session:
                    with contextlib.suppress(SessionExists):
                        await client.create_session(sandbox_id, SESSION)
                    trajectory.session = True
                run = await client.run(
                    sandbox_id, source, session=SESSION, timeout=self.settings.timeout
                )
                trajectory.session = not run.session_ended
                output, exit_code = run.output_bytes(), run.exit_code
                timed_out, duration = run.timed_out, run.duration
            else:
                script = f".verl/{uuid.uuid4().hex[:12]}.py"
                await client.write_file(sandbox_id, script, source.encode())
                result = await client.exec(
                    sandbox_id, ["python3", script], timeout=self.settings.timeout
                )
                output = result.stdout_bytes() + result.stderr_bytes()
                exit_code, timed_out, duration = (
                    result.exit_code,
                    result.timed_out,
                    result.duration,
                )
            trajectory.calls += 1
            trajectory.last_used = self._clock()
        text = output.decode("utf-8", errors="replace")
        limit = self.settings.max_output_chars
        if len(text) > limit:
            text = "...(truncated)\n" + text[-limit:]
        sep = "\n" if text and not text.endswith("\n") else ""
        if timed_out:
            text += f"{sep}[timed out after {self.settings.timeout:g}s]"
        elif exit_code != 0:
            text += f"{sep}[exit code {exit_code}]"
        metrics = {
            "exit_code": exit_code,
            "timed_out": timed_out,
            "duration": duration,
            "sandbox_id": sandbox_id,
            "trajectory_calls": trajectory.calls,
        }
        return self._response(text), 0.0, metrics

    async def calc_reward(self, instance_id: str, **kwargs: Any) -> float:
        """Run the verifier (``reward_command`` of create_kwargs or config) in the sandbox.

        Returns:
            The verifier's last stdout line as a float, else 1.0 on exit 0 and 0.0 otherwise;
            0.0 when no verifier is configured.
        """
        trajectory = self._trajectory(instance_id, kwargs)
        command = trajectory.create_kwargs.get("reward_command") or self.settings.reward_command
        if not command:
            return 0.0
        async with trajectory.lock, self._losing(trajectory):
            sandbox_id = await self._sandbox(trajectory)
            result = await (await self._platform()).exec(
                sandbox_id, str(command), timeout=self.settings.timeout
            )
            trajectory.last_used = self._clock()
        stdout = result.stdout_bytes().decode("utf-8", errors="replace")
        return parse_reward(stdout, result.exit_code)

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        """Forget an instance; delete its sandbox if the instance was the trajectory.

        A per-call instance of a request-keyed trajectory leaves the sandbox to later calls of
        the same request (and to the idle reaper).
        """
        instance = self._instances.pop(instance_id, None)
        if instance is None or instance.key is None:
            return
        trajectory = self._trajectories.get(instance.key)
        if trajectory is not None and trajectory.owned_by == instance_id:
            await self._end(trajectory)

    # ------------------------------------------------------------------ lifetimes

    async def release_trajectory(self, request_id: str) -> bool:
        """Delete the sandbox of a request-keyed trajectory now (e.g. when a rollout ends).

        Returns:
            Whether there was one.
        """
        trajectory = self._trajectories.get(f"request:{request_id}")
        if trajectory is None:
            return False
        await self._end(trajectory)
        return True

    async def reap_idle(self, now: float | None = None) -> list[str]:
        """Delete the sandboxes of trajectories idle for ``idle_ttl_seconds``.

        The reaper task calls this every ``reap_interval_seconds``; a trajectory in the middle
        of a call is never reaped.

        Returns:
            The keys of the trajectories ended.
        """
        now = self._clock() if now is None else now
        idle = [
            t
            for t in list(self._trajectories.values())
            if not t.lock.locked() and now - t.last_used >= self.settings.idle_ttl_seconds
        ]
        for trajectory in idle:
            await self._end(trajectory)
        return [t.key for t in idle]

    @property
    def sandboxes(self) -> dict[str, str]:
        """Live sandboxes by trajectory key (for metrics and tests)."""
        return {k: t.sandbox_id for k, t in self._trajectories.items() if t.sandbox_id}

    async def aclose(self) -> None:
        """Stop the reaper, delete every sandbox of the tool, close the client."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for trajectory in list(self._trajectories.values()):
            await self._end(trajectory)
        self._instances.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------------ internals

    def _response(self, text: str) -> Any:
        return self._response_cls(text=text)

    async def _platform(self) -> AsyncClient:
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                if self.settings.transport == "ray":
                    # Looking the platform's actors up by name blocks: keep it off the loop.
                    self._client = await run_sync(AsyncClient.from_ray, self.settings.namespace)
                else:
                    self._client = AsyncClient(self.settings.base_url, token=self.settings.token)
            return self._client

    def _trajectory(self, instance_id: str, kwargs: Mapping[str, Any]) -> _Trajectory:
        """The trajectory of an instance, bound on its first execute (no await: no races)."""
        instance = self._instances.get(instance_id)
        if instance is None:
            raise NotFound(f"no tool instance {instance_id!r}: call create() first")
        if instance.key is None:
            rid = _request_id(kwargs)
            instance.key = f"request:{rid}" if rid else f"instance:{instance_id}"
        trajectory = self._trajectories.get(instance.key)
        if trajectory is None:
            owner = None if instance.key.startswith("request:") else instance_id
            trajectory = _Trajectory(instance.key, owner, create_kwargs=instance.create_kwargs)
            trajectory.last_used = self._clock()
            self._trajectories[instance.key] = trajectory
        return trajectory

    async def _sandbox(self, trajectory: _Trajectory) -> str:
        """The trajectory's sandbox, created and set up on first use (call under its lock)."""
        if trajectory.sandbox_id is not None:
            return trajectory.sandbox_id
        client = await self._platform()
        token = uuid.uuid4().hex
        request = CreateSandboxRequest(
            client_token=token,
            image=self.settings.image,
            env=dict(self.settings.env),
            owner=self.settings.owner,
            ttl_seconds=self.settings.ttl_seconds,
            labels={
                "rock-serve/integration": "verl",
                "rock-serve/trajectory": _label(trajectory.key),
            },
        )
        try:
            record = await client.create_sandbox(request)
        except BaseException:
            # The answer may be lost while the create goes on (a cancelled call): undo it.
            await asyncio.shield(self._delete_created(client, token))
            raise
        trajectory.sandbox_id = record.id
        try:
            files = trajectory.create_kwargs.get("files") or {}
            for path, content in dict(files).items():
                data = content.encode() if isinstance(content, str) else bytes(content)
                await client.write_file(record.id, str(path), data)
            setup = [
                *self.settings.setup_commands,
                *trajectory.create_kwargs.get("setup_commands", []),
            ]
            for command in setup:
                result = await client.exec(record.id, str(command), timeout=self.settings.timeout)
                if result.exit_code != 0:
                    raise InvalidRequest(
                        f"setup command {command!r} failed with exit code {result.exit_code}: "
                        f"{result.stderr_bytes().decode(errors='replace')[-500:]}"
                    )
        except BaseException:
            trajectory.sandbox_id = None
            await asyncio.shield(self._delete(record.id))
            raise
        return record.id

    @contextlib.asynccontextmanager
    async def _losing(self, trajectory: _Trajectory) -> AsyncIterator[None]:
        """Forget the trajectory's sandbox if a call finds it gone (the next call recreates it)."""
        try:
            yield
        except (SandboxNotFound, SandboxNotRunning, SandboxFailed, RockletUnavailable):
            trajectory.sandbox_id = None
            trajectory.session = False
            raise
        except SessionNotFound:
            trajectory.session = False
            raise

    async def _end(self, trajectory: _Trajectory) -> None:
        """Forget a trajectory and delete its sandbox."""
        if self._trajectories.get(trajectory.key) is trajectory:
            del self._trajectories[trajectory.key]
        sandbox_id, trajectory.sandbox_id = trajectory.sandbox_id, None
        trajectory.session = False
        if sandbox_id is not None:
            await asyncio.shield(self._delete(sandbox_id))

    async def _delete(self, sandbox_id: str) -> None:
        try:
            await (await self._platform()).delete_sandbox(sandbox_id)
        except SandboxNotFound:
            pass
        except RockError:
            log.warning("could not delete sandbox %s (its TTL will)", sandbox_id, exc_info=True)

    @staticmethod
    async def _delete_created(client: AsyncClient, client_token: str) -> None:
        with contextlib.suppress(RockError):
            await client.delete_by_token(client_token)

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reap_interval_seconds)
            try:
                await self.reap_idle()
            except Exception:
                log.warning("verl tool reaper failed", exc_info=True)
