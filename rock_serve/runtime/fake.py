"""Fake runtime: sandboxes in memory, for unit tests of everything above the runtime.

:meth:`FakeRuntime.start` returns a real :class:`RockletHandle` connected over a socket pair
to an in-process :class:`FakeAgent` that speaks the rocklet's frame protocol. The agent keeps
files in a dict and understands a handful of commands: ``echo``, ``true``, ``false``,
``exit N``, ``cat PATH`` and ``sleep N``; anything else exits 127. Tests inject failures
with :meth:`FakeRuntime.fail_next` and simulate a rocklet's death with
:meth:`FakeRuntime.kill_agent`.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import shlex
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from rock_serve.errors import Conflict, SandboxNotFound, SandboxNotRunning
from rock_serve.protocol import FailureReason, SandboxInfo, SandboxSpec, SandboxState
from rock_serve.rocklet.agent import FrameError, encode_frame, read_frame
from rock_serve.rocklet.handle import RockletHandle
from rock_serve.runtime._state import check_id, labels_for, matches
from rock_serve.runtime.base import Runtime

__all__ = ["FakeAgent", "FakeRuntime"]


class _OpError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class FakeAgent:
    """An in-memory rocklet: same frames and operations, no processes."""

    def __init__(self, files: dict[str, bytes], dirs: set[str]) -> None:
        self.files, self.dirs = files, dirs
        self.sessions: set[str] = set()
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.inputs: dict[int, tuple[str, dict[str, Any], bytearray]] = {}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer frames until EOF."""
        self.writer = writer
        try:
            while True:
                try:
                    frame = await read_frame(reader)
                except FrameError as exc:
                    self._send({"id": None, "type": "error", "error": _err("bad_frame", str(exc))})
                    break
                if frame is None:
                    break
                self._dispatch(*frame)
        finally:
            for task in self.tasks.values():
                task.cancel()
            with contextlib.suppress(Exception):
                writer.close()

    def _send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            self.writer.write(encode_frame(header, payload))

    def _dispatch(self, header: dict[str, Any], payload: bytes) -> None:
        rid, kind = header.get("id"), header.get("type")
        if not isinstance(rid, int):
            self._send({"id": None, "type": "error", "error": _err("bad_frame", "bad id")})
        elif kind == "chunk" and rid in self.inputs:
            self.inputs[rid][2].extend(payload)
        elif kind == "end" and rid in self.inputs:
            op, args, data = self.inputs.pop(rid)
            self._start(rid, op, args, bytes(data))
        elif kind == "cancel":
            task = self.tasks.get(rid)
            if task is not None:
                task.cancel()
        elif header.get("more"):
            self.inputs[rid] = (str(header.get("op")), header.get("args") or {}, bytearray(payload))
        else:
            self._start(rid, str(header.get("op")), header.get("args") or {}, payload)

    def _start(self, rid: int, op: str, args: dict[str, Any], payload: bytes) -> None:
        self.tasks[rid] = asyncio.ensure_future(self._handle(rid, op, args, payload))

    async def _handle(self, rid: int, op: str, args: dict[str, Any], payload: bytes) -> None:
        try:
            handler = getattr(self, "_op_" + op.replace(".", "_"), None)
            if handler is None:
                raise _OpError("unknown_operation", f"unknown operation: {op!r}")
            data, out = await handler(args, payload)
            self._send({"id": rid, "type": "result", "data": data}, out)
        except asyncio.CancelledError:
            self._send({"id": rid, "type": "error", "error": _err("conflict", "request cancelled")})
        except _OpError as exc:
            self._send({"id": rid, "type": "error", "error": _err(exc.code, exc.message)})
        finally:
            self.tasks.pop(rid, None)

    # ------------------------------------------------------------------ commands

    async def _run(self, command: str, timeout: float | None) -> tuple[int, bytes, bytes, bool]:
        """Run one fake command: ``(exit code, stdout, stderr, timed out)``."""
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            return 2, b"", f"bash: syntax error: {exc}\n".encode(), False
        if not argv or argv[0] == "true":
            return 0, b"", b"", False
        name, rest = argv[0], argv[1:]
        if name == "false":
            return 1, b"", b"", False
        if name == "exit":
            return (int(rest[0]) if rest else 0), b"", b"", False
        if name == "echo":
            return 0, (" ".join(rest) + "\n").encode(), b"", False
        if name == "cat":
            out = b""
            for p in rest:
                path = posixpath.normpath(posixpath.join("/", p))
                if path not in self.files:
                    return 1, out, f"cat: {p}: No such file or directory\n".encode(), False
                out += self.files[path]
            return 0, out, b"", False
        if name == "sleep":
            try:
                await asyncio.wait_for(asyncio.sleep(float(rest[0])), timeout)
            except asyncio.TimeoutError:
                return 130, b"", b"", True
            return 0, b"", b"", False
        return 127, b"", f"bash: {name}: command not found\n".encode(), False

    async def _op_ping(self, args: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        return {"version": "fake", "pid": 0, "python": "fake", "root": "/"}, b""

    def _session(self, args: dict[str, Any]) -> str:
        name = str(args.get("session", "default"))
        if name not in self.sessions:
            raise _OpError("session_not_found", f"no session named {name!r}")
        return name

    async def _op_session_create(self, args: dict[str, Any], payload: bytes) -> Any:
        name = str(args.get("session", "default"))
        if name in self.sessions:
            raise _OpError("session_exists", f"session {name!r} exists already")
        self.sessions.add(name)
        return {"session": name}, b""

    async def _op_session_run(self, args: dict[str, Any], payload: bytes) -> Any:
        name = self._session(args)
        started = time.monotonic()
        code, out, err, timed_out = await self._run(
            str(args.get("command", "")), args.get("timeout")
        )
        out += err
        ended = str(args.get("command", "")).split()[:1] == ["exit"]
        if ended:
            self.sessions.discard(name)
        cap = int(args.get("max_output_bytes", 1 << 20))
        data = {
            "session": name,
            "exit_code": code,
            "duration": time.monotonic() - started,
            "timed_out": timed_out,
            "truncated": len(out) > cap,
            "session_restarted": False,
            "session_ended": ended,
        }
        return data, out[:cap]

    async def _op_session_stdin(self, args: dict[str, Any], payload: bytes) -> Any:
        self._session(args)
        return {}, b""

    _op_session_interrupt = _op_session_stdin

    async def _op_session_close(self, args: dict[str, Any], payload: bytes) -> Any:
        self.sessions.discard(self._session(args))
        return {}, b""

    async def _op_session_list(self, args: dict[str, Any], payload: bytes) -> Any:
        return {"sessions": sorted(self.sessions)}, b""

    async def _op_exec(self, args: dict[str, Any], payload: bytes) -> Any:
        command = args.get("command")
        text = shlex.join(command) if isinstance(command, list) else str(command)
        started = time.monotonic()
        code, stdout, stderr, timed_out = await self._run(text, args.get("timeout"))
        if timed_out:
            code = 137
        data = {
            "exit_code": code,
            "stdout_len": len(stdout),
            "duration": time.monotonic() - started,
            "timed_out": timed_out,
            "truncated": False,
        }
        return data, stdout + stderr

    # ------------------------------------------------------------------ files

    def _path(self, args: dict[str, Any]) -> str:
        raw = args.get("path")
        if not isinstance(raw, str) or not raw or "\0" in raw:
            raise _OpError("invalid_request", "path must be a non-empty string")
        return posixpath.normpath(posixpath.join("/", raw))

    def _info(self, path: str) -> dict[str, Any]:
        if path in self.dirs:
            kind, size, mode = "dir", 0, 0o755
        elif path in self.files:
            kind, size, mode = "file", len(self.files[path]), 0o644
        else:
            raise _OpError("file_not_found", f"no such file: {path}")
        name = posixpath.basename(path) or "/"
        return {"path": path, "name": name, "type": kind, "size": size, "mode": mode, "mtime": 0.0}

    async def _op_file_read(self, args: dict[str, Any], payload: bytes) -> Any:
        path = self._path(args)
        if path in self.dirs:
            raise _OpError("is_a_directory", f"{path} is a directory")
        self._info(path)
        data = self.files[path]
        offset, length = int(args.get("offset") or 0), args.get("length")
        chunk = data[offset:] if length is None else data[offset : offset + int(length)]
        return {"size": len(data), "length": len(chunk)}, chunk

    async def _op_file_write(self, args: dict[str, Any], payload: bytes) -> Any:
        path = self._path(args)
        if path in self.dirs:
            raise _OpError("is_a_directory", f"{path} is a directory")
        parent = posixpath.dirname(path)
        if parent not in self.dirs:
            if not args.get("make_parents", True):
                raise _OpError("file_not_found", f"no such directory: {parent}")
            await self._op_file_mkdir({"path": parent}, b"")
        self.files[path] = payload
        return {"size": len(payload)}, b""

    async def _op_file_stat(self, args: dict[str, Any], payload: bytes) -> Any:
        return self._info(self._path(args)), b""

    async def _op_file_list(self, args: dict[str, Any], payload: bytes) -> Any:
        path = self._path(args)
        if path not in self.dirs:
            self._info(path)
            raise _OpError("not_a_directory", f"{path} is not a directory")
        names = {p for p in (*self.files, *self.dirs) if p != "/" and posixpath.dirname(p) == path}
        return {"path": path, "entries": [self._info(p) for p in sorted(names)]}, b""

    async def _op_file_mkdir(self, args: dict[str, Any], payload: bytes) -> Any:
        path = self._path(args)
        while path not in self.dirs:
            if path in self.files:
                raise _OpError("not_a_directory", f"{path} is a file")
            self.dirs.add(path)
            path = posixpath.dirname(path)
        return {}, b""

    async def _op_file_remove(self, args: dict[str, Any], payload: bytes) -> Any:
        path = self._path(args)
        if path == "/":
            raise _OpError("permission_denied", "refusing to remove the sandbox root")
        if path in self.files:
            del self.files[path]
        elif path in self.dirs:
            inside = [p for p in (*self.files, *self.dirs) if p.startswith(path + "/")]
            if inside and not args.get("recursive"):
                raise _OpError("is_a_directory", f"{path} is a directory (use recursive)")
            for p in inside:
                self.files.pop(p, None)
                self.dirs.discard(p)
            self.dirs.discard(path)
        elif not args.get("missing_ok"):
            raise _OpError("file_not_found", f"no such file: {path}")
        return {}, b""

    async def _op_stats(self, args: dict[str, Any], payload: bytes) -> Any:
        return {"cpu_count": 1, "pids_current": 1, "cgroup": None}, b""

    async def _op_shutdown(self, args: dict[str, Any], payload: bytes) -> Any:
        self.sessions.clear()
        return {}, b""


def _err(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


@dataclass
class _Box:
    info: SandboxInfo
    files: dict[str, bytes] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=lambda: {"/", "/root", "/tmp"})
    agent_writer: asyncio.StreamWriter | None = None
    host_writer: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None
    handle: RockletHandle | None = None


class FakeRuntime(Runtime):
    """Sandboxes in memory; see the module docstring."""

    name = "fake"

    def __init__(self) -> None:
        self._boxes: dict[str, _Box] = {}
        self._failures: dict[str, list[BaseException]] = {}

    def fail_next(self, method: str, exc: BaseException) -> None:
        """Make the next call of ``method`` (``"create"``, ``"start"``, ...) raise ``exc``."""
        self._failures.setdefault(method, []).append(exc)

    def fail_next_create(self, exc: BaseException) -> None:
        """Make the next :meth:`create` raise ``exc``."""
        self.fail_next("create", exc)

    def _maybe_fail(self, method: str) -> None:
        pending = self._failures.get(method)
        if pending:
            raise pending.pop(0)

    def _box(self, sandbox_id: str) -> _Box:
        box = self._boxes.get(sandbox_id)
        if box is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return box

    def _set(self, box: _Box, state: SandboxState, reason: FailureReason | None = None) -> None:
        box.info = box.info.model_copy(update={"state": state, "reason": reason})

    async def create(self, sandbox_id: str, spec: SandboxSpec) -> SandboxInfo:
        """Record a pending sandbox."""
        self._maybe_fail("create")
        check_id(sandbox_id)
        if sandbox_id in self._boxes:
            raise Conflict(f"sandbox {sandbox_id!r} exists already")
        info = SandboxInfo(
            id=sandbox_id,
            state=SandboxState.PENDING,
            runtime=self.name,
            image=spec.image,
            labels=labels_for(sandbox_id, spec, self.name),
            created_at=time.time(),
        )
        self._boxes[sandbox_id] = _Box(info)
        return info

    async def start(self, sandbox_id: str) -> RockletHandle:
        """Connect a handle to a fresh in-process agent (files survive restarts)."""
        self._maybe_fail("start")
        box = self._box(sandbox_id)
        if box.info.state == SandboxState.RUNNING:
            raise Conflict(f"sandbox {sandbox_id!r} is running already")
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours)
        a_reader, a_writer = await asyncio.open_connection(sock=theirs, limit=1 << 27)
        agent = FakeAgent(box.files, box.dirs)
        box.agent_writer, box.task = (
            a_writer,
            asyncio.ensure_future(agent.serve(a_reader, a_writer)),
        )
        box.host_writer = writer
        box.handle = RockletHandle(reader, writer, name=sandbox_id)
        self._set(box, SandboxState.RUNNING)
        return box.handle

    async def attach(self, sandbox_id: str) -> RockletHandle:
        """Reconnect to a running sandbox: the old handle is dropped, files survive."""
        self._maybe_fail("attach")
        box = self._box(sandbox_id)
        if box.info.state != SandboxState.RUNNING:
            raise SandboxNotRunning(f"sandbox {sandbox_id!r} is {box.info.state.value}")
        await self._disconnect(box)
        self._set(box, SandboxState.STOPPED)
        return await self.start(sandbox_id)

    @staticmethod
    async def _stop_agent(box: _Box) -> None:
        """End the in-process agent: its side of the pipe closes, the handle sees EOF."""
        if box.agent_writer is not None:
            box.agent_writer.close()
        if box.task is not None:
            box.task.cancel()
            await asyncio.gather(box.task, return_exceptions=True)

    async def _disconnect(self, box: _Box) -> None:
        await self._stop_agent(box)
        if box.handle is not None:
            await box.handle.close()
        box.agent_writer = box.host_writer = box.task = box.handle = None

    async def kill_agent(
        self, sandbox_id: str, reason: FailureReason = FailureReason.AGENT_EXITED
    ) -> None:
        """Simulate the rocklet dying (e.g. ``reason=FailureReason.OOM_KILLED``)."""
        box = self._box(sandbox_id)
        await self._stop_agent(box)
        if box.handle is not None:
            await box.handle.wait_closed()  # every waiting call fails with RockletUnavailable
        self._set(box, SandboxState.FAILED, reason)

    async def stop(self, sandbox_id: str) -> None:
        """Disconnect the agent; files stay."""
        self._maybe_fail("stop")
        box = self._box(sandbox_id)
        await self._disconnect(box)
        if box.info.state == SandboxState.RUNNING:
            self._set(box, SandboxState.STOPPED)

    async def remove(self, sandbox_id: str) -> None:
        """Forget the sandbox; a missing one is no error."""
        self._maybe_fail("remove")
        box = self._boxes.pop(sandbox_id, None)
        if box is not None:
            await self._disconnect(box)

    async def inspect(self, sandbox_id: str) -> SandboxInfo:
        """The recorded state."""
        self._maybe_fail("inspect")
        return self._box(sandbox_id).info

    async def list(self, labels: dict[str, str] | None = None) -> list[SandboxInfo]:
        """Every sandbox whose labels include ``labels``."""
        self._maybe_fail("list")
        return [b.info for b in self._boxes.values() if matches(b.info.labels, labels)]

    async def close(self) -> None:
        """Disconnect every agent."""
        for box in self._boxes.values():
            await self._disconnect(box)
