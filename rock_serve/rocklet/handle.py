"""RockletHandle: the host-side asyncio client of one rocklet over its pipes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

from rock_serve.errors import BadFrame, RockletUnavailable, error_class
from rock_serve.protocol import (
    ExecRequest,
    ExecResult,
    FileInfo,
    ListDirResult,
    OutputChunk,
    SandboxStats,
    SessionCreateRequest,
    SessionCreateResponse,
    SessionRunRequest,
    SessionRunResult,
    encode_bytes,
)
from rock_serve.rocklet import agent as _agent
from rock_serve.rocklet.agent import CHUNK, MAX_HEADER, MAX_PAYLOAD, FrameError, encode_frame
from rock_serve.rocklet.agent import read_frame as _read_frame

__all__ = ["AGENT_PATH", "RockletHandle", "agent_argv", "install_agent"]

log = logging.getLogger(__name__)

#: The agent program; runtimes copy or bind-mount it into sandboxes.
AGENT_PATH: str = _agent.__file__

# Imported as a module (not run as a script) so that a compiled .pyc is used; ssl is blocked
# because the agent never uses it and asyncio would spend ~10 ms importing it.
_BOOT = (
    "import sys;sys.modules['ssl']=None;sys.path[:0]=[{dir!r}];import agent;"
    "sys.exit(agent.main(sys.argv[1:]))"
)


def agent_argv(python: str, agent_dir: str, *args: str) -> list[str]:
    """The command line that starts the rocklet found in ``agent_dir`` (as seen by ``python``).

    Start-up time is sandbox create time: the agent is imported with ``-I -S`` from
    ``agent_dir``, whose ``__pycache__`` (see :func:`install_agent`) saves compiling it.
    """
    return [python, "-I", "-S", "-c", _BOOT.format(dir=agent_dir), *args]


def install_agent(target_dir: str) -> str:
    """Copy the agent into ``target_dir`` with a compiled ``__pycache__``; returns the dir.

    Runtimes bind-mount that dir read-only into sandboxes. The .pyc is for this interpreter's
    version; another Python in an image simply compiles the source in memory.
    """
    import py_compile
    import shutil

    os.makedirs(target_dir, exist_ok=True)
    dest = os.path.join(target_dir, "agent.py")
    tmp = f"{dest}.{os.getpid()}.tmp"
    shutil.copy2(AGENT_PATH, tmp)
    os.replace(tmp, dest)
    py_compile.compile(
        dest, doraise=True, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP
    )
    return target_dir


Frame = tuple[dict[str, Any], bytes]


class _Call:
    """One in-flight request: a queue of reply frames ending with a result or an error."""

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Frame | BaseException] = asyncio.Queue()


class RockletHandle:
    """Multiplexes many concurrent requests to one rocklet over a pair of byte streams.

    If the rocklet dies or its pipe closes, every waiting call fails at once with
    :class:`~rock_serve.errors.RockletUnavailable`, and so does every later call.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        process: asyncio.subprocess.Process | None = None,
        name: str = "",
        on_close: Callable[[RockletHandle], None] | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.process = process
        self.name = name
        self._on_close = on_close
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._error: RockletUnavailable | None = None
        self._closed = asyncio.Event()
        self._read_task = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def spawn(
        cls,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        name: str = "",
        **popen_kwargs: Any,
    ) -> RockletHandle:
        """Start ``argv`` (a rocklet) as a subprocess and connect to its stdin/stdout."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
                cwd=cwd,
                limit=MAX_PAYLOAD + MAX_HEADER,
                **popen_kwargs,
            )
        except OSError as exc:
            raise RockletUnavailable(f"cannot start rocklet: {exc}") from None
        assert proc.stdout is not None and proc.stdin is not None
        return cls(proc.stdout, proc.stdin, process=proc, name=name)

    # ------------------------------------------------------------------ plumbing

    @property
    def alive(self) -> bool:
        """True until the rocklet's pipe closed or :meth:`close` was called."""
        return self._error is None

    async def wait_closed(self) -> None:
        """Wait until the connection to the rocklet is gone."""
        await self._closed.wait()

    async def _read_loop(self) -> None:
        reason = "rocklet exited"
        try:
            while True:
                frame = await _read_frame(self._reader)
                if frame is None:
                    break
                header, payload = frame
                rid = header.get("id")
                call = self._calls.get(rid) if isinstance(rid, int) else None
                if call is not None:
                    call.queue.put_nowait((header, payload))
                elif header.get("type") == "error":
                    log.warning("rocklet %s: %s", self.name, header.get("error"))
        except FrameError as exc:
            reason = f"rocklet sent a bad frame: {exc}"
        except (ConnectionError, OSError) as exc:
            reason = f"rocklet pipe failed: {exc}"
        except asyncio.CancelledError:
            reason = "rocklet handle closed"
        finally:
            await self._fail(reason)

    async def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = RockletUnavailable(f"{self.name or 'rocklet'}: {reason}")
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, asyncio.TimeoutError):
                await asyncio.wait_for(self.process.wait(), 0.2)
        if self.process is not None and self.process.returncode is not None:
            self._error.details.setdefault("exit_code", self.process.returncode)
        for call in self._calls.values():
            call.queue.put_nowait(self._error)
        self._calls.clear()
        if not self._closed.is_set():
            self._closed.set()
            if self._on_close is not None:
                self._on_close(self)

    def _send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if self._error is not None:
            raise self._error
        if len(payload) > MAX_PAYLOAD:
            raise BadFrame(f"payload of {len(payload)} bytes is over the frame limit")
        try:
            self._writer.write(encode_frame(header, payload))
        except (ConnectionError, RuntimeError) as exc:
            raise RockletUnavailable(f"{self.name or 'rocklet'}: {exc}") from None

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise RockletUnavailable(f"{self.name or 'rocklet'}: {exc}") from None

    async def _stream(
        self,
        op: str,
        args: dict[str, Any],
        payload: bytes = b"",
        *,
        upload: AsyncIterable[bytes] | None = None,
    ) -> AsyncIterator[Frame]:
        """Send one request and yield its reply frames; the last one is the result."""
        if self._error is not None:
            raise self._error
        rid = next(self._ids)
        call = _Call()
        self._calls[rid] = call
        finished = False
        try:
            header: dict[str, Any] = {"id": rid, "op": op, "args": args}
            if upload is not None:
                header["more"] = True
            self._send(header, payload)
            if upload is not None:
                async for data in upload:
                    for i in range(0, len(data), CHUNK):
                        self._send({"id": rid, "type": "chunk"}, bytes(data[i : i + CHUNK]))
                        await self._drain()
                self._send({"id": rid, "type": "end"})
            await self._drain()
            while True:
                item = await call.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                header, data = item
                kind = header.get("type")
                if kind == "error":
                    finished = True
                    err = header.get("error") or {}
                    raise error_class(str(err.get("code")))(str(err.get("message", "")))
                if kind == "result":
                    finished = True
                yield header, data
                if finished:
                    return
        finally:
            self._calls.pop(rid, None)
            if not finished and self._error is None:
                # The caller gave up (cancelled or stopped iterating): tell the rocklet.
                with contextlib.suppress(Exception):
                    self._send({"id": rid, "type": "cancel"})

    async def request(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        payload: bytes = b"",
        *,
        upload: AsyncIterable[bytes] | None = None,
    ) -> tuple[dict[str, Any], bytes]:
        """Send one request; return its result data and payload (chunks are concatenated)."""
        chunks: list[bytes] = []
        async for header, data in self._stream(op, args or {}, payload, upload=upload):
            if header.get("type") == "result":
                chunks.append(data)
                return header.get("data") or {}, b"".join(chunks)
            chunks.append(data)
        raise RockletUnavailable("rocklet ended the reply without a result")  # pragma: no cover

    async def close(self) -> None:
        """Close the pipe (the rocklet exits on EOF) and wait for the process to end."""
        with contextlib.suppress(Exception):
            self._writer.close()
        if self.process is not None and self.process.returncode is None:
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        if not self._read_task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._read_task), 1)
            except asyncio.TimeoutError:
                self._read_task.cancel()
        await self._fail("rocklet handle closed")

    # ------------------------------------------------------------------ operations

    async def ping(self) -> dict[str, Any]:
        """Round trip to the rocklet; returns its version, pid and python."""
        data, _ = await self.request("ping")
        return data

    async def create_session(
        self, req: SessionCreateRequest | None = None
    ) -> SessionCreateResponse:
        """Start a persistent bash session."""
        req = req or SessionCreateRequest()
        data, out = await self.request("session.create", req.model_dump(exclude_none=True))
        return SessionCreateResponse(session=data["session"], output=out.decode("utf-8", "replace"))

    async def run_in_session(self, req: SessionRunRequest) -> SessionRunResult:
        """Run a command in a session and wait for it (or its timeout)."""
        data, out = await self.request("session.run", req.model_dump())
        (text,), encoding = encode_bytes(out)
        return SessionRunResult(output=text, encoding=encoding, **data)

    async def stream_in_session(
        self, req: SessionRunRequest
    ) -> AsyncIterator[OutputChunk | SessionRunResult]:
        """Run a command in a session, yielding output chunks as they come, then the result."""
        args = req.model_dump()
        args["stream"] = True
        async for header, data in self._stream("session.run", args):
            if header.get("type") == "result":
                yield SessionRunResult(output="", **header["data"])
            else:
                (text,), encoding = encode_bytes(data)
                yield OutputChunk(stream="output", data=text, encoding=encoding)

    async def session_stdin(self, session: str, data: bytes, *, eof: bool = False) -> None:
        """Write to the stdin of the command running in ``session``."""
        await self.request("session.stdin", {"session": session, "eof": eof}, data)

    async def interrupt_session(self, session: str = "default") -> None:
        """Send SIGINT to the command running in ``session``."""
        await self.request("session.interrupt", {"session": session})

    async def close_session(self, session: str = "default") -> None:
        """Close ``session`` and kill its processes."""
        await self.request("session.close", {"session": session})

    async def list_sessions(self) -> list[str]:
        """Names of the open sessions."""
        data, _ = await self.request("session.list")
        return list(data["sessions"])

    @staticmethod
    def _exec_args(req: ExecRequest) -> tuple[dict[str, Any], bytes]:
        args = req.model_dump(exclude={"stdin"}, exclude_none=True)
        if req.timeout is None:
            args["timeout"] = None
        return args, (req.stdin or "").encode()

    async def exec(self, req: ExecRequest) -> ExecResult:
        """Run one command to completion in a fresh process."""
        args, stdin = self._exec_args(req)
        data, out = await self.request("exec", args, stdin)
        n = data.pop("stdout_len")
        (stdout, stderr), encoding = encode_bytes(out[:n], out[n:])
        return ExecResult(stdout=stdout, stderr=stderr, encoding=encoding, **data)

    async def stream_exec(self, req: ExecRequest) -> AsyncIterator[OutputChunk | ExecResult]:
        """Run one command, yielding stdout/stderr chunks as they come, then the result."""
        args, stdin = self._exec_args(req)
        args["stream"] = True
        async for header, data in self._stream("exec", args, stdin):
            if header.get("type") == "result":
                result = dict(header["data"])
                result.pop("stdout_len", None)
                yield ExecResult(stdout="", stderr="", **result)
            else:
                (text,), encoding = encode_bytes(data)
                yield OutputChunk(
                    stream=header.get("stream", "stdout"), data=text, encoding=encoding
                )

    async def read_file(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """Read a file's bytes (any size; they arrive in chunks)."""
        _, data = await self.request(
            "file.read", {"path": path, "offset": offset, "length": length}
        )
        return data

    async def iter_file(self, path: str) -> AsyncIterator[bytes]:
        """Yield a file's bytes chunk by chunk without holding it whole."""
        async for _, data in self._stream("file.read", {"path": path}):
            if data:
                yield data

    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes],
        *,
        mode: int | None = None,
        make_parents: bool = True,
    ) -> int:
        """Write a file atomically from bytes or an async iterable of chunks; returns its size."""
        args = {"path": path, "mode": mode, "make_parents": make_parents}
        if isinstance(data, bytes | bytearray | memoryview):
            blob = bytes(data)
            if len(blob) <= CHUNK:
                result, _ = await self.request("file.write", args, blob)
                return int(result["size"])
            data = _chunks(blob)
        result, _ = await self.request("file.write", args, upload=data)
        return int(result["size"])

    async def stat(self, path: str) -> FileInfo:
        """Stat a path (symlinks are not followed)."""
        data, _ = await self.request("file.stat", {"path": path})
        return FileInfo(**data)

    async def list_dir(self, path: str) -> ListDirResult:
        """List a directory."""
        data, _ = await self.request("file.list", {"path": path})
        return ListDirResult(**data)

    async def mkdir(self, path: str, *, parents: bool = True, exist_ok: bool = True) -> None:
        """Create a directory."""
        await self.request("file.mkdir", {"path": path, "parents": parents, "exist_ok": exist_ok})

    async def remove(self, path: str, *, recursive: bool = False, missing_ok: bool = False) -> None:
        """Remove a file, or a directory with ``recursive=True``."""
        args = {"path": path, "recursive": recursive, "missing_ok": missing_ok}
        await self.request("file.remove", args)

    async def download_tar(self, path: str) -> AsyncIterator[bytes]:
        """Yield an uncompressed tar stream of ``path`` (a file or a directory)."""
        async for _, data in self._stream("tar.download", {"path": path}):
            if data:
                yield data

    async def upload_tar(self, path: str, data: bytes | AsyncIterable[bytes]) -> None:
        """Extract a tar stream (plain or compressed) into directory ``path``."""
        stream = _chunks(bytes(data)) if isinstance(data, bytes | bytearray) else data
        await self.request("tar.upload", {"path": path}, upload=stream)

    async def stats(self) -> SandboxStats:
        """CPU, memory and process usage and limits as the sandbox sees them."""
        data, _ = await self.request("stats")
        return SandboxStats(**data)


async def _chunks(blob: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(blob), CHUNK):
        yield blob[i : i + CHUNK]
