"""SkyRL text envs backed by rock-serve: :class:`SkyRLEnv` (one of our envs) and
:class:`SkyRLSandboxEnv` (a bare sandbox whose actions are bash).

Both have the shape of SkyRL's ``skyrl_gym.envs.base_text_env.BaseTextEnv`` (skyrl-gym 0.4.0)
and subclass it when ``skyrl_gym`` is installed, so ``skyrl_gym.make`` accepts them:
``__init__(env_config=None, extras=None)``, ``init(prompt) -> (messages, metadata)``,
``step(action: str) -> {"observations", "reward", "done", "metadata"}``, ``close()``,
``get_metrics()``. Register one with SkyRL and name it in the trainer's config::

    import skyrl_gym
    skyrl_gym.register("rock", entry_point="rock_serve.envs.integrations._skyrl:SkyRLEnv")
    # skyrl_gym: {rock: {base_url: "http://127.0.0.1:8000", env_id: "rock/Terminal-v0"}}

``env_config`` (one per trainer) and ``extras`` (one per dataset row; SkyRL adds ``max_turns``)
are merged, ``extras`` winning. Keys: ``base_url`` and ``token`` (default ``ROCK_BASE_URL`` and
``ROCK_TOKEN``), ``timeout``, ``max_turns``; for :class:`SkyRLEnv` also ``env_id``,
``env_kwargs``, ``seed``, ``options``; for :class:`SkyRLSandboxEnv` ``image``, ``ttl_seconds``,
``setup_commands``, ``files``, ``reward_command``, ``submit_command`` and ``command_timeout``.

**Threads.** SkyRL calls ``init``/``step``/``close`` synchronously from a thread pool
(``skyrl_gym.max_env_workers``, 32 by default; raise it when more trajectories run at once),
and one trajectory's calls may land on different threads. Every env made with the same settings
shares one SDK :class:`~rock_serve.sdk.Client` whose transport keeps one connection pool per
thread (:class:`PerThreadTransport`): no client and no connection per call, and no pool shared
between threads.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import httpx

from rock_serve.envs import make, output_text
from rock_serve.errors import InvalidRequest, RockError, SandboxNotFound
from rock_serve.protocol import CreateSandboxRequest
from rock_serve.sdk import Client, ClientSettings

__all__ = [
    "PerThreadTransport",
    "SkyRLEnv",
    "SkyRLSandboxEnv",
    "TextEnvStepOutput",
    "thread_local_client",
    "thread_transport",
]

Message = dict[str, str]
Conversation = list[Message]


class _StepOutput(TypedDict):
    observations: Conversation
    reward: float
    done: bool
    metadata: dict[str, Any]


class TextEnvStepOutput(_StepOutput, total=False):
    """SkyRL's ``BaseTextEnvStepOutput``: what ``step`` returns (``postprocessed_action`` is
    optional).
    """

    postprocessed_action: str | None


class _TextEnvBase:
    """The shape of SkyRL's ``BaseTextEnv`` (used when skyrl_gym is not installed)."""

    def __init__(self) -> None:
        self.turns = 0
        self.max_turns = 1
        self.tool_groups: list[Any] = []
        self.tool_to_toolgroup: dict[str, Any] = {}

    def init(self, prompt: Conversation) -> tuple[Conversation, dict[str, Any]]:
        """The first messages for the model, and metadata."""
        return prompt, {}

    def step(self, action: str) -> TextEnvStepOutput:
        """Apply the model's output."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the env holds."""

    def get_metrics(self) -> dict[str, Any]:
        """Metrics of the episode."""
        return {}

    @staticmethod
    def aggregate_metrics(metrics: list[dict[str, Any]]) -> dict[str, Any]:
        """Mean of each numeric metric over episodes."""
        keys = {k for m in metrics for k, v in m.items() if isinstance(v, int | float)}
        out: dict[str, Any] = {}
        for key in sorted(keys):
            values = [float(m[key]) for m in metrics if isinstance(m.get(key), int | float)]
            out[key] = sum(values) / len(values)
        return out

    def __enter__(self) -> _TextEnvBase:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


if TYPE_CHECKING:
    _Base = _TextEnvBase
else:
    try:
        from skyrl_gym.envs.base_text_env import BaseTextEnv as _Base
    except ImportError:
        _Base = _TextEnvBase


# ----------------------------------------------------------------------------- HTTP per thread


class _Slot:
    """A thread's pool, held in its thread-local storage: dropped (and its pool closed) when
    the thread ends.
    """

    __slots__ = ("__weakref__", "pool")

    def __init__(self, pool: httpx.HTTPTransport) -> None:
        self.pool = pool


class PerThreadTransport(httpx.BaseTransport):
    """An httpx transport that gives each calling thread its own connection pool.

    One :class:`httpx.HTTPTransport` is made per thread on that thread's first request and
    reused by all its later requests. A thread's pool is closed when the thread ends, and
    :meth:`close` (or interpreter exit) closes those still open.
    """

    def __init__(self, **transport_kwargs: Any) -> None:
        """``transport_kwargs`` are those of :class:`httpx.HTTPTransport` (limits, retries...)."""
        self._kwargs = transport_kwargs
        self._local = threading.local()
        self._lock = threading.Lock()
        self._closers: list[weakref.finalize[Any, Any]] = []
        self._made = 0

    @property
    def pool_count(self) -> int:
        """How many per-thread pools were made (one per thread that sent a request)."""
        return self._made

    @property
    def open_pools(self) -> int:
        """How many per-thread pools are open (their threads are alive)."""
        with self._lock:
            return sum(1 for closer in self._closers if closer.alive)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the calling thread's pool."""
        slot: _Slot | None = getattr(self._local, "slot", None)
        if slot is None:
            pool = httpx.HTTPTransport(**self._kwargs)
            slot = _Slot(pool)
            closer = weakref.finalize(slot, pool.close)
            with self._lock:
                self._closers = [c for c in self._closers if c.alive]
                self._closers.append(closer)
                self._made += 1
            self._local.slot = slot
        return slot.pool.handle_request(request)

    def close(self) -> None:
        """Close every thread's pool."""
        with self._lock:
            closers, self._closers = self._closers, []
        for closer in closers:
            closer()
        self._local = threading.local()


_CLIENTS: dict[ClientSettings, tuple[Client, PerThreadTransport]] = {}
_CLIENTS_LOCK = threading.Lock()


def thread_local_client(
    base_url: str | None = None, *, token: str | None = None, timeout: float | None = None
) -> Client:
    """The process's shared SDK client for these settings, pooling connections per thread.

    Made on first use (settings fall back to ``ROCK_BASE_URL``, ``ROCK_TOKEN``,
    ``ROCK_TIMEOUT``) and kept for the process's life; its transport is a
    :class:`PerThreadTransport`.
    """
    settings = ClientSettings.from_env(base_url=base_url, token=token, timeout=timeout)
    with _CLIENTS_LOCK:
        entry = _CLIENTS.get(settings)
        if entry is None:
            transport = PerThreadTransport()
            client = Client(
                settings.base_url,
                token=settings.token or "",
                timeout=settings.timeout,
                transport=transport,
            )
            entry = _CLIENTS[settings] = (client, transport)
        return entry[0]


def thread_transport(client: Client) -> PerThreadTransport:
    """The per-thread transport of a :func:`thread_local_client` (its pool counts).

    Raises:
        InvalidRequest: ``client`` was not made by :func:`thread_local_client`.
    """
    with _CLIENTS_LOCK:
        for made, transport in _CLIENTS.values():
            if made is client:
                return transport
    raise InvalidRequest("not a client made by thread_local_client()")


def _config(env_config: Any, extras: Mapping[str, Any] | None) -> dict[str, Any]:
    """``env_config`` (a dict or an OmegaConf DictConfig) overridden by ``extras``."""
    merged: dict[str, Any] = {}
    if env_config is not None:
        items = env_config.items() if hasattr(env_config, "items") else vars(env_config).items()
        merged.update({str(k): v for k, v in items})
    merged.update(extras or {})
    return merged


def _client_of(config: Mapping[str, Any]) -> Client:
    timeout = config.get("timeout")
    return thread_local_client(
        config.get("base_url"),
        token=config.get("token"),
        timeout=float(timeout) if timeout is not None else None,
    )


def _plain(value: Any) -> Any:
    """An OmegaConf container (or anything mapping/sequence-like) as plain dicts and lists."""
    if isinstance(value, str | bytes) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- envs


class SkyRLEnv(_Base):
    """One of our registered envs (``rock_serve.envs.make(env_id, ...)``) as a SkyRL text env.

    ``init(prompt)`` resets the env (its sandbox is created then) and returns the prompt
    followed by the env's first observation as a user message; each ``step(action)`` is one
    env step, its observation the next user message. ``done`` when the env terminates or
    truncates, or after ``max_turns`` steps; the reward is the env's. ``close()`` deletes the
    sandbox.
    """

    def __init__(self, env_config: Any = None, extras: Mapping[str, Any] | None = None) -> None:
        """Make the env (no sandbox yet); see the module docstring for the keys.

        Raises:
            InvalidRequest: No ``env_id``.
            EnvNotFound: Unknown ``env_id``.
            InvalidEnvKwargs: ``env_kwargs`` the env does not take.
        """
        super().__init__()
        config = _config(env_config, extras)
        env_id = config.get("env_id")
        if not isinstance(env_id, str) or not env_id:
            raise InvalidRequest("SkyRLEnv needs an env_id (in env_config or extras)")
        self.env_id = env_id
        self.seed: int | None = config.get("seed")
        self.options: dict[str, Any] | None = _plain(config.get("options"))
        self.max_turns = int(config.get("max_turns") or 1_000_000)
        self.total_reward = 0.0
        self.env = make(env_id, client=_client_of(config), **_plain(config.get("env_kwargs", {})))

    def init(self, prompt: Conversation) -> tuple[Conversation, dict[str, Any]]:
        """Reset the env: the prompt, then its first observation as a user message."""
        self.turns = 0
        self.total_reward = 0.0
        obs, info = self.env.reset(seed=self.seed, options=self.options)
        messages = [*(prompt or []), {"role": "user", "content": str(obs)}]
        return messages, {"env_id": self.env_id, **info}

    def step(self, action: str) -> TextEnvStepOutput:
        """One env step; its observation is the next user message (none once done)."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.turns += 1
        self.total_reward += float(reward)
        done = bool(terminated or truncated) or self.turns >= self.max_turns
        metadata = {**info, "terminated": terminated, "truncated": truncated}
        if done:
            metadata["observation"] = str(obs)
        observations = [] if done else [{"role": "user", "content": str(obs)}]
        return TextEnvStepOutput(
            observations=observations, reward=float(reward), done=done, metadata=metadata
        )

    def close(self) -> None:
        """Close the env (deleting its sandbox); idempotent."""
        self.env.close()  # type: ignore[no-untyped-call,unused-ignore]  # gymnasium 1.2

    def get_metrics(self) -> dict[str, Any]:
        """Steps and total reward of the episode."""
        return {"steps": self.turns, "total_reward": self.total_reward}


_BLOCKS = (r"<bash>(.*?)</bash>", r"```(?:bash|sh)\n(.*?)```")


class SkyRLSandboxEnv(_Base):
    """A bare sandbox as a SkyRL text env: each action is bash run in a persistent session.

    ``init`` creates the sandbox, writes ``files``, runs ``setup_commands`` and returns the
    prompt unchanged. An action's command is its first ``<bash>...</bash>`` block or fenced
    bash block, else the whole action; its output and exit code are the next user message.
    The command ``submit_command`` (default ``submit``), or reaching ``max_turns``, ends the
    episode: ``reward_command`` then runs and the reward is 1.0 if it exits 0, else 0.0 (no
    ``reward_command``: 0.0). ``close()`` deletes the sandbox; its ``ttl_seconds`` is the
    backstop.
    """

    SESSION: ClassVar[str] = "skyrl"

    def __init__(self, env_config: Any = None, extras: Mapping[str, Any] | None = None) -> None:
        """Configure the env (no sandbox yet); see the module docstring for the keys."""
        super().__init__()
        config = _config(env_config, extras)
        self.client = _client_of(config)
        self.image: str | None = config.get("image")
        self.ttl_seconds = float(config.get("ttl_seconds") or 3600.0)
        self.setup_commands = [str(c) for c in _plain(config.get("setup_commands")) or []]
        self.files = {str(k): str(v) for k, v in (_plain(config.get("files")) or {}).items()}
        self.reward_command: str | None = config.get("reward_command")
        self.submit_command = str(config.get("submit_command") or "submit")
        self.command_timeout = float(config.get("command_timeout") or 30.0)
        self.max_turns = int(config.get("max_turns") or 1_000_000)
        self.sandbox_id: str | None = None
        self.reward = 0.0

    def init(self, prompt: Conversation) -> tuple[Conversation, dict[str, Any]]:
        """Create and prepare the sandbox; the prompt is the first message list."""
        self.close()
        self.turns = 0
        self.reward = 0.0
        request = CreateSandboxRequest(
            image=self.image,
            ttl_seconds=self.ttl_seconds,
            labels={"rock-serve/integration": "skyrl"},
            owner="skyrl",
        )
        self.sandbox_id = self.client.create_sandbox(request).id
        try:
            for path, text in self.files.items():
                self.client.write_file(self.sandbox_id, path, text.encode())
            self.client.create_session(self.sandbox_id, self.SESSION)
            for command in self.setup_commands:
                result = self.client.run(
                    self.sandbox_id, command, session=self.SESSION, timeout=self.command_timeout
                )
                if result.exit_code != 0:
                    raise InvalidRequest(
                        f"setup command {command!r} exited {result.exit_code}: "
                        f"{output_text(result)[-500:]}"
                    )
        except BaseException:
            self.close()
            raise
        return list(prompt or []), {"sandbox_id": self.sandbox_id}

    def step(self, action: str) -> TextEnvStepOutput:
        """Run the action's command; the last turn (or ``submit``) runs the reward command."""
        if self.sandbox_id is None:
            raise InvalidRequest("call init() before step()")
        self.turns += 1
        command = _command(action)
        metadata: dict[str, Any] = {"command": command}
        if command.strip() == self.submit_command:
            return self._finish(metadata)
        result = self.client.run(
            self.sandbox_id, command, session=self.SESSION, timeout=self.command_timeout
        )
        text = output_text(result)
        if result.exit_code != 0:
            text += f"\n[exit code {result.exit_code}]"
        if result.timed_out:
            text += f"\n[timed out after {self.command_timeout:g}s]"
        metadata["exit_code"] = result.exit_code
        if self.turns >= self.max_turns:
            output = self._finish(metadata)
            output["metadata"]["observation"] = text
            return output
        return TextEnvStepOutput(
            observations=[{"role": "user", "content": text}],
            reward=0.0,
            done=False,
            metadata=metadata,
        )

    def _finish(self, metadata: dict[str, Any]) -> TextEnvStepOutput:
        assert self.sandbox_id is not None
        if self.reward_command:
            result = self.client.exec(
                self.sandbox_id, ["bash", "-c", self.reward_command], timeout=self.command_timeout
            )
            self.reward = 1.0 if result.exit_code == 0 and not result.timed_out else 0.0
            metadata["reward_exit_code"] = result.exit_code
        return TextEnvStepOutput(observations=[], reward=self.reward, done=True, metadata=metadata)

    def close(self) -> None:
        """Delete the sandbox (idempotent; the shared client stays open)."""
        sandbox_id, self.sandbox_id = self.sandbox_id, None
        if sandbox_id is not None:
            try:
                self.client.delete_sandbox(sandbox_id)
            except SandboxNotFound:
                pass
            except (RockError, httpx.HTTPError):
                pass  # its TTL removes it

    def get_metrics(self) -> dict[str, Any]:
        """Turns and reward of the episode."""
        return {"turns": self.turns, "reward": self.reward}


def _command(action: str) -> str:
    for pattern in _BLOCKS:
        found = re.search(pattern, action, re.DOTALL)
        if found is not None:
            return found.group(1).strip()
    return action.strip()
