"""The episode state machine shared by the sync and async sandbox envs (sans-IO).

:class:`Machine` runs a core's generators, turns the operations they yield into effects (SDK
client calls on the env's sandbox, relative to the episode directory), and keeps the episode's
order: no step before a reset, none after the episode ended or a step failed, none after close.
The drivers (:mod:`rock_serve.envs._env`, :mod:`rock_serve.envs._async_env`) differ only in how
they perform an effect: a call, or an awaited call.
"""

from __future__ import annotations

import enum
import io
import itertools
import os
import posixpath
import tarfile
import time
from collections.abc import Generator
from typing import Any, Generic, Literal, TypeVar

import numpy as np

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
)
from rock_serve.envs._errors import EnvClosed, EpisodeOver, InvalidAction, ResetNeeded
from rock_serve.envs._lease import AcquireSandbox, Call, CallLLM, DropSandbox, Effect, Lease
from rock_serve.errors import (
    FileNotFound,
    InvalidRequest,
    RockError,
    RockletUnavailable,
    SandboxFailed,
    SandboxNotFound,
    SandboxNotRunning,
    SessionExists,
    SessionNotFound,
)
from rock_serve.protocol import SessionRunResult
from rock_serve.protocol.llm import LLMAnswer

__all__ = ["SANDBOX_LOST", "Machine", "OnSandboxError", "names"]

ObsT = TypeVar("ObsT")
ActT = TypeVar("ActT")
T = TypeVar("T")

#: Errors after which the sandbox is gone for good: it is dropped and the next reset makes a
#: new one.
SANDBOX_LOST: tuple[type[RockError], ...] = (
    RockletUnavailable,
    SandboxFailed,
    SandboxNotFound,
    SandboxNotRunning,
)

OnSandboxError = Literal["raise", "terminate"]

_COUNTER = itertools.count(1)


def names(shared: bool) -> tuple[str, str]:
    """Session name and episode directory of a new env (unique ones in a shared sandbox)."""
    if not shared:
        return "env", "task"
    n = f"{os.getpid()}-{next(_COUNTER)}"
    return f"env-{n}", f"envs/{n}"


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DONE = "done"
    BROKEN = "broken"
    CLOSED = "closed"


class _Dir(enum.Enum):
    ABSENT = "absent"
    CLEAN = "clean"
    DIRTY = "dirty"


def _tar(files: WriteFiles) -> bytes:
    buf = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dirs: set[str] = set()
        for path, content in files.files.items():
            name = posixpath.normpath(path)
            if name.startswith(("/", "../")) or name in (".", ".."):
                raise InvalidRequest(f"WriteFiles paths must be relative and inside: {path!r}")
            parent = posixpath.dirname(name)
            while parent and parent not in dirs:
                dirs.add(parent)
                info = tarfile.TarInfo(parent)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, now
                tar.addfile(info)
                parent = posixpath.dirname(parent)
            data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), now
            info.mode = 0o755 if path in files.executable else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Machine(Generic[ObsT, ActT]):
    """One env's episode logic around a core (see the module docstring)."""

    def __init__(
        self,
        core: EnvCore[ObsT, ActT],
        lease: Lease,
        *,
        max_episode_steps: int | None,
        on_sandbox_error: OnSandboxError,
    ) -> None:
        if on_sandbox_error not in ("raise", "terminate"):
            raise InvalidRequest(
                f"on_sandbox_error must be 'raise' or 'terminate', not {on_sandbox_error!r}"
            )
        if max_episode_steps is not None and max_episode_steps < 1:
            raise InvalidRequest(f"max_episode_steps must be >= 1, not {max_episode_steps}")
        self.core = core
        self.lease = lease
        self.max_episode_steps = max_episode_steps
        self.on_sandbox_error: OnSandboxError = on_sandbox_error
        self._state = _State.NEW
        self._dir = _Dir.ABSENT
        self._session_open = False
        self._ctx: EpisodeContext | None = None
        self.stepping = False

    @property
    def closed(self) -> bool:
        """Whether the env was closed."""
        return self._state is _State.CLOSED

    @property
    def episode_over(self) -> bool:
        """Whether the last step terminated or truncated the episode."""
        return self._state is _State.DONE

    def adopt(self, source: Machine[ObsT, ActT], core: EnvCore[ObsT, ActT]) -> None:
        """Continue ``source``'s freshly reset episode in a fork of its sandbox (issue 16).

        ``core`` is a copy of ``source``'s core; the lease already names the fork. Sessions are
        not cloned by a fork, so the env's session is opened again at the next command.
        """
        if source._state is not _State.RUNNING:
            raise InvalidRequest("only an env that has just been reset can be forked")
        self.core = core
        self._state = _State.RUNNING
        self._dir = source._dir
        self._session_open = False
        self._ctx = source._ctx

    def close(self) -> None:
        """Refuse every later call (the driver releases the lease)."""
        self._state = _State.CLOSED
        self._session_open = False

    # -----------------------------------------------------------------------------------------
    # Reset and step

    def reset(
        self, np_random: np.random.Generator, seed: int | None, options: dict[str, Any] | None
    ) -> Generator[Effect, Any, tuple[ObsT, dict[str, Any]]]:
        """Start an episode: acquire or tidy the sandbox, then run the core's reset."""
        if self._state is _State.CLOSED:
            raise EnvClosed("the env is closed")
        self._check_idle()
        self._state = _State.BROKEN  # until this reset succeeds
        ctx = EpisodeContext(
            np_random=np_random,
            seed=seed,
            options=dict(options or {}),
            max_episode_steps=self.max_episode_steps,
        )
        self.stepping = True
        rng_state = np_random.bit_generator.state
        try:
            for attempt in (1, 2):
                try:
                    if self.core.uses_sandbox:
                        yield from self._new_episode()
                    obs, info = yield from self._run_core(self.core.reset(ctx))
                    break
                except SANDBOX_LOST:
                    # The sandbox died between episodes (or its TTL ended): start over once,
                    # with the same random state so that the task stays the seeded one.
                    yield DropSandbox()
                    if attempt == 2:
                        raise
                    np_random.bit_generator.state = rng_state
        finally:
            self.stepping = False
        self._ctx = ctx
        self._state = _State.RUNNING
        info = dict(info)
        if self.lease.sandbox_id is not None:
            info.setdefault("sandbox_id", self.lease.sandbox_id)
        return obs, info

    def step(
        self, action: ActT
    ) -> Generator[Effect, Any, tuple[ObsT, float, bool, bool, dict[str, Any]]]:
        """Run the core's step, keeping the episode order."""
        if self._state is _State.CLOSED:
            raise EnvClosed("the env is closed")
        self._check_idle()
        if self._state is _State.NEW:
            raise ResetNeeded("call reset() before step()")
        if self._state is _State.DONE:
            raise EpisodeOver("the episode is over (terminated or truncated): call reset()")
        if self._state is _State.BROKEN:
            raise ResetNeeded("the last reset or step failed: call reset()")
        if not self.core.action_space.contains(action):
            raise InvalidAction(f"action {_short(action)} is not in {self.core.action_space}")
        ctx = self._ctx
        assert ctx is not None
        self._state = _State.BROKEN  # until this step succeeds
        self.stepping = True
        try:
            obs, reward, terminated, truncated, info = yield from self._run_core(
                self.core.step(action, ctx)
            )
        except SANDBOX_LOST as exc:
            yield DropSandbox()
            if self.on_sandbox_error == "raise":
                raise
            self._state = _State.DONE
            lost = {"sandbox_error": exc.code.value, "message": exc.message}
            return self.core.sandbox_lost(exc), 0.0, True, False, lost
        finally:
            self.stepping = False
        ctx.step += 1
        terminated, truncated = bool(terminated), bool(truncated)
        if not terminated and ctx.max_episode_steps is not None:
            truncated = truncated or ctx.step >= ctx.max_episode_steps
        self._state = _State.DONE if terminated or truncated else _State.RUNNING
        return obs, float(reward), terminated, truncated, info

    def _check_idle(self) -> None:
        if self.stepping:
            raise InvalidRequest("another reset() or step() of this env is still running")

    def _new_episode(self) -> Generator[Effect, Any, None]:
        sid = self.lease.sandbox_id
        if sid is None:
            yield AcquireSandbox()
            self._session_open = False
            self._dir = _Dir.ABSENT
            return
        if self._session_open:
            self._session_open = False
            try:
                yield Call("close_session", (sid,), {"session": self.lease.session})
            except SessionNotFound:
                pass
        if self._dir is _Dir.DIRTY:
            yield Call("remove", (sid, self.lease.workdir), {"recursive": True, "missing_ok": True})
            self._dir = _Dir.ABSENT

    # -----------------------------------------------------------------------------------------
    # Running a core

    def _run_core(self, gen: Generator[Op, Any, T]) -> Generator[Effect, Any, T]:
        """Drive a core generator: translate each op it yields, send back results or errors.

        Errors that mean the sandbox is gone are not thrown into the core: they end the step.
        """
        send: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    op = gen.send(send) if error is None else gen.throw(error)
                except StopIteration as stop:
                    result: T = stop.value
                    return result
                send, error = None, None
                try:
                    send = yield from self._perform(op)
                except SANDBOX_LOST:
                    raise
                except RockError as exc:
                    error = exc
        finally:
            gen.close()

    def _perform(self, op: Op) -> Generator[Effect, Any, Any]:
        sid = self.lease.sandbox_id
        if sid is None:
            raise InvalidRequest(
                f"{type(self.core).__name__} yielded {type(op).__name__} but has no sandbox "
                "(uses_sandbox is False)"
            )
        if isinstance(op, LLMPoll):
            return (yield CallLLM("poll_calls", (sid, op.wait, op.max_calls)))
        if isinstance(op, LLMRespond):
            answer = LLMAnswer(response=op.response, error=op.error)
            return (yield CallLLM("answer_call", (sid, op.call_id, answer)))
        workdir = self.lease.workdir
        if isinstance(op, WriteFiles):
            self._dir = _Dir.DIRTY
            yield Call("upload_archive", (sid, workdir, _tar(op)))
            return None
        if self._dir is _Dir.ABSENT:
            yield Call("mkdir", (sid, workdir))
        self._dir = _Dir.DIRTY
        if isinstance(op, Run):
            return (yield from self._run(sid, op))
        if isinstance(op, Exec):
            kwargs = {
                "cwd": workdir,
                "stdin": op.stdin,
                "env": op.env,
                "timeout": op.timeout,
                "max_output_bytes": op.max_output_bytes,
            }
            return (yield Call("exec", (sid, op.command), kwargs))
        if isinstance(op, ReadFile):
            try:
                return (yield Call("read_file", (sid, posixpath.join(workdir, op.path))))
            except FileNotFound:
                if op.missing_ok:
                    return None
                raise
        raise InvalidRequest(f"not an env operation: {op!r}")

    def _run(self, sid: str, op: Run) -> Generator[Effect, Any, SessionRunResult]:
        session = self.lease.session
        if not self._session_open:
            try:
                yield Call("create_session", (sid, session), {"cwd": self.lease.workdir})
            except SessionExists:
                # Left over from an episode whose close failed: start clean.
                yield Call("close_session", (sid,), {"session": session})
                yield Call("create_session", (sid, session), {"cwd": self.lease.workdir})
            self._session_open = True
        kwargs = {
            "session": session,
            "timeout": op.timeout,
            "max_output_bytes": op.max_output_bytes,
        }
        try:
            result: SessionRunResult = yield Call("run", (sid, op.command), kwargs)
        except SessionNotFound:
            self._session_open = False
            raise
        if result.session_ended:
            self._session_open = False
        return result


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
