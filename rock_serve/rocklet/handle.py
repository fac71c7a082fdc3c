"""RockletHandle: the host-side asyncio client of one rocklet over its pipes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, TypeVar, cast

from pydantic import BaseModel

from rock_serve._tracing import SPANS, traced, untraced_task
from rock_serve.errors import RockletUnavailable, TooLarge, error_class
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
from rock_serve.protocol.ops import (
    OPS,
    ExecOp,
    FileListOp,
    FileReadOp,
    FileStatOp,
    MkdirOp,
    Op,
    RemoveOp,
    SessionCloseOp,
    SessionCreateOp,
    SessionInterruptOp,
    SessionRunOp,
    StatsOp,
    Streams,
    TarDownloadOp,
)
from rock_serve.rocklet import agent as _agent
from rock_serve.rocklet._processes import ProcessOps
from rock_serve.rocklet.agent import CHUNK, HEADER, MAX_HEADER, MAX_PAYLOAD, FrameError
from rock_serve.rocklet.agent import read_frame as _read_frame

__all__ = [
    "AGENT_PATH",
    "PtyProcess",
    "RockletHandle",
    "agent_argv",
    "install_agent",
    "read_result",
]

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
R = TypeVar("R")
ItemT = TypeVar("ItemT")


class _Call:
    """One in-flight request: a queue of reply frames ending with a result or an error."""

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Frame | BaseException] = asyncio.Queue()


class RockletHandle(ProcessOps):
    """Multiplexes many concurrent requests to one rocklet over a pair of byte streams.

    If the rocklet dies or its pipe closes, every waiting call fails at once with
    :class:`~rock_serve.errors.RockletUnavailable`, and so does every later call; so it does
    when a watched rocklet (:meth:`watch`) stops answering. :attr:`failure` says which.

    A request that would not fit one frame is refused here with
    :class:`~rock_serve.errors.TooLarge`, before it reaches the rocklet.

    Each request frame carries the caller's trace id (``"trace"``, from
    :data:`rock_serve._tracing.TRACE_ID`) when there is one: the rocklet writes it in its log
    lines about the op and in the error it returns.
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
        #: Why the rocklet is gone: ``agent_exited`` (pipe closed, process ended) or
        #: ``agent_unresponsive`` (no answer to a liveness ping); None while alive or after
        #: :meth:`close`.
        self.failure: str | None = None
        self._last_seen = asyncio.get_running_loop().time()
        self._watchdog: asyncio.Task[None] | None = None
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
                self._last_seen = asyncio.get_running_loop().time()
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
            if reason != "rocklet handle closed" and self._error is None:
                self.failure = "agent_exited"
            await self._fail(reason)

    async def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = RockletUnavailable(f"{self.name or 'rocklet'}: {reason}")
            if self.failure is not None:
                self._error.details["reason"] = self.failure
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
        if "op" in header and "trace" not in header:
            trace_id = traced()
            if trace_id is not None:
                header["trace"] = trace_id
        head = json.dumps(header, separators=(",", ":")).encode("utf-8")
        if len(head) > MAX_HEADER or len(payload) > MAX_PAYLOAD:
            # The rocklet would drop it: refuse it here, where the caller gets the reason.
            if len(head) > MAX_HEADER:
                what, size, limit = "arguments", len(head), MAX_HEADER
            else:
                what, size, limit = "input", len(payload), MAX_PAYLOAD
            raise TooLarge(
                f"the request's {what} ({size} bytes) are over the rocklet's frame limit of "
                f"{limit} bytes",
                limit=limit,
            )
        try:
            self._writer.write(HEADER.pack(len(head), len(payload)) + head + payload)
        except (ConnectionError, RuntimeError) as exc:
            raise RockletUnavailable(f"{self.name or 'rocklet'}: {exc}") from None

    # ------------------------------------------------------------------ liveness

    def watch(self, interval: float, timeout: float) -> None:
        """Detect a rocklet that stops answering (stopped, traced, wedged) while its pipe is
        open: when nothing came from it for ``interval`` seconds, ping it; without an answer
        within ``timeout`` seconds the handle fails with ``failure = "agent_unresponsive"``
        (every waiting and later call gets :class:`~rock_serve.errors.RockletUnavailable`).
        """
        if self._watchdog is None and self._error is None:
            # untraced: its pings must not carry the trace of the call that started it
            self._watchdog = untraced_task(self._watch(interval, timeout))

    def unwatch(self) -> None:
        """Stop :meth:`watch` (a paused sandbox's rocklet cannot answer pings)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    async def _watch(self, interval: float, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        while self._error is None:
            idle = loop.time() - self._last_seen
            if idle < interval:
                await asyncio.sleep(interval - idle)
                continue
            try:
                await asyncio.wait_for(self.request("ping"), timeout)
            except asyncio.TimeoutError:
                if self._error is None:
                    self.failure = "agent_unresponsive"
                    log.warning("rocklet %s: no answer to a ping in %.1f s", self.name, timeout)
                    with contextlib.suppress(Exception):
                        self._writer.close()  # a rocklet that wakes up sees EOF and exits
                    await self._fail(f"rocklet did not answer a ping within {timeout:g} s")
                    self._read_task.cancel()
                return
            except RockletUnavailable:
                return
            self._last_seen = loop.time()

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
        # The op's span (when spans are exported) ends with its result or error: a caller
        # that returns on the result frame leaves this generator suspended until collected.
        span = contextlib.ExitStack()
        span.enter_context(
            SPANS.span(f"rocklet {op}", {"rock.sandbox_id": self.name}, current=False)
        )
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
                    raise _error(header)
                if kind == "result":
                    finished = True
                    span.close()
                yield header, data
                if finished:
                    return
        except BaseException as exc:
            span.__exit__(type(exc), exc, exc.__traceback__)
            raise
        finally:
            span.close()
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
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
        with contextlib.suppress(Exception):
            self._writer.close()
        if self.process is not None and self.process.returncode is None:
            try:
                # An unresponsive rocklet will not read its EOF: do not wait for it.
                grace = 0 if self.failure == "agent_unresponsive" else 5
                await asyncio.wait_for(self.process.wait(), grace)
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

    @staticmethod
    def _frame(
        kind: type[Op[Any]], model: BaseModel, extra: dict[str, Any] | None
    ) -> tuple[dict[str, Any], bytes, AsyncIterable[bytes] | None]:
        """The frame of an operation of type ``kind`` whose fields ``model`` holds: its fields
        as the arguments (plus ``extra``), its payload field as the payload (chunked past one
        frame when it is an upload).
        """
        plan = _PLANS.get(kind)
        if plan is None:
            skip = {name for name in ("op", "idempotency_key", kind.payload) if name is not None}
            plan = _PLANS[kind] = (skip, kind.payload, kind.upload is not None)
        skip, field, upload = plan
        args = model.model_dump(mode="json", exclude=skip, exclude_defaults=True)
        if extra:
            args.update(extra)
        payload = b""
        if field is not None:
            value = getattr(model, field)
            payload = value.encode() if isinstance(value, str) else bytes(value or b"")
        if upload and len(payload) > CHUNK:
            return args, b"", _chunks(payload)
        return args, payload, None

    async def _op(
        self, kind: type[Op[Any]], model: BaseModel, extra: dict[str, Any] | None = None
    ) -> Any:
        tag = _tag(kind)
        args, payload, upload = self._frame(kind, model, extra)
        data, out = await self.request(tag, args, payload, upload=upload)
        return read_result(OPS[tag].result, model, data, out)

    async def op(self, operation: Op[R], extra: dict[str, Any] | None = None) -> R:
        """Send one operation (see :class:`~rock_serve.protocol.ops.Op`); its result, read
        back by the result type's shape. ``extra``: arguments the caller adds (limits).
        """
        return cast(R, await self._op(type(operation), operation, extra))

    async def op_stream(
        self, operation: Streams[ItemT], extra: dict[str, Any] | None = None
    ) -> AsyncIterator[ItemT]:
        """Send one operation asking for its output as it comes: raw chunks when it streams
        bytes, else :class:`OutputChunk` items and then the result.
        """
        kind = cast(type[Op[Any]], type(operation))
        tag = _tag(kind)
        spec = OPS[tag]
        args, payload, upload = self._frame(kind, cast(BaseModel, operation), extra)
        if spec.item is bytes:
            async for _, data in self._stream(tag, args, payload, upload=upload):
                if data:
                    yield cast(ItemT, data)
            return
        args["stream"] = True
        async for header, data in self._stream(tag, args, payload, upload=upload):
            if header.get("type") == "result":
                result = read_result(spec.result, operation, header.get("data") or {}, b"")
                yield cast(ItemT, result)
            else:
                (text,), encoding = encode_bytes(data)
                chunk = OutputChunk(
                    stream=header.get("stream", "output"), data=text, encoding=encoding
                )
                yield cast(ItemT, chunk)

    # Typed conveniences for code that holds a handle (the rocklet's HTTP mode, runtimes'
    # tests, fork, benchmarks): each is the operation above; a new operation needs none.

    async def ping(self) -> dict[str, Any]:
        """Round trip to the rocklet; returns its version, pid and python."""
        data, _ = await self.request("ping")
        return data

    async def create_session(
        self, req: SessionCreateRequest | None = None, *, max_sessions: int | None = None
    ) -> SessionCreateResponse:
        """Start a persistent bash session (refused with ``resource_exhausted`` when the
        sandbox has ``max_sessions`` already; None = the rocklet's default bound).
        """
        extra = None if max_sessions is None else {"max_sessions": max_sessions}
        result: SessionCreateResponse = await self._op(
            SessionCreateOp, req or SessionCreateRequest(), extra
        )
        return result

    async def run_in_session(self, req: SessionRunRequest) -> SessionRunResult:
        """Run a command in a session and wait for it (or its timeout)."""
        result: SessionRunResult = await self._op(SessionRunOp, req)
        return result

    async def stream_in_session(
        self, req: SessionRunRequest
    ) -> AsyncIterator[OutputChunk | SessionRunResult]:
        """Run a command in a session, yielding output chunks as they come, then the result."""
        async for item in self.op_stream(SessionRunOp.of(req)):
            yield item

    async def session_stdin(self, session: str, data: bytes, *, eof: bool = False) -> None:
        """Write to the stdin of the command running in ``session``."""
        await self.request("session.stdin", {"session": session, "eof": eof}, data)

    async def interrupt_session(self, session: str = "default") -> None:
        """Send SIGINT to the command running in ``session``."""
        await self.op(SessionInterruptOp(session=session))

    async def close_session(self, session: str = "default") -> None:
        """Close ``session`` and kill its processes."""
        await self.op(SessionCloseOp(session=session))

    async def list_sessions(self) -> list[str]:
        """Names of the open sessions."""
        data, _ = await self.request("session.list")
        return list(data["sessions"])

    async def exec(self, req: ExecRequest) -> ExecResult:
        """Run one command to completion in a fresh process."""
        result: ExecResult = await self._op(ExecOp, req)
        return result

    async def stream_exec(self, req: ExecRequest) -> AsyncIterator[OutputChunk | ExecResult]:
        """Run one command, yielding stdout/stderr chunks as they come, then the result."""
        async for item in self.op_stream(ExecOp.of(req)):
            yield item

    async def read_file(
        self,
        path: str,
        *,
        offset: int = 0,
        length: int | None = None,
        max_bytes: int | None = None,
    ) -> bytes:
        """Read a file's bytes (they arrive in chunks).

        Raises:
            TooLarge: more than ``max_bytes`` would come (None = no bound).
        """
        args = {"path": path, "offset": offset, "length": length, "max_bytes": max_bytes}
        _, data = await self.request("file.read", args)
        return data

    async def iter_file(self, path: str, *, max_bytes: int | None = None) -> AsyncIterator[bytes]:
        """Yield a file's bytes chunk by chunk without holding it whole.

        Raises:
            TooLarge: at once for a regular file over ``max_bytes``; for anything else (a
                device, a growing file) once ``max_bytes`` have come.
        """
        async for chunk in self.op_stream(FileReadOp(path=path), {"max_bytes": max_bytes}):
            yield chunk

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
        return await self.op(FileStatOp(path=path))

    async def list_dir(self, path: str) -> ListDirResult:
        """List a directory."""
        return await self.op(FileListOp(path=path))

    async def mkdir(self, path: str, *, parents: bool = True, exist_ok: bool = True) -> None:
        """Create a directory."""
        await self.op(MkdirOp(path=path, parents=parents, exist_ok=exist_ok))

    async def remove(self, path: str, *, recursive: bool = False, missing_ok: bool = False) -> None:
        """Remove a file, or a directory with ``recursive=True``."""
        await self.op(RemoveOp(path=path, recursive=recursive, missing_ok=missing_ok))

    async def download_tar(
        self, path: str, *, max_bytes: int | None = None
    ) -> AsyncIterator[bytes]:
        """Yield an uncompressed tar stream of ``path`` (a file or a directory).

        Raises:
            TooLarge: once the tar passes ``max_bytes`` (None = no bound).
        """
        async for chunk in self.op_stream(TarDownloadOp(path=path), {"max_bytes": max_bytes}):
            yield chunk

    async def upload_tar(self, path: str, data: bytes | AsyncIterable[bytes]) -> None:
        """Extract a tar stream (plain or compressed) into directory ``path``."""
        stream = _chunks(bytes(data)) if isinstance(data, bytes | bytearray) else data
        await self.request("tar.upload", {"path": path}, upload=stream)

    async def stats(self) -> SandboxStats:
        """CPU, memory and process usage and limits as the sandbox sees them."""
        return await self.op(StatsOp())

    def pty(
        self,
        *,
        cols: int = 80,
        rows: int = 24,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> PtyProcess:
        """An interactive process (default: ``bash -i``) on a pseudo-terminal in the sandbox.

        Use it as ``async with handle.pty() as p:``; leaving the block kills the process tree.
        """
        args: dict[str, Any] = {"cols": cols, "rows": rows}
        if command is not None:
            args["command"] = command
        if env:
            args["env"] = env
        if cwd is not None:
            args["cwd"] = cwd
        return PtyProcess(self, args)


class PtyProcess:
    """A process on a pty: :meth:`send` keystrokes, iterate over its output bytes, :meth:`wait`.

    Output is read by one consumer: iterate it, or call :meth:`wait`, which discards what was
    not read.
    """

    def __init__(self, handle: RockletHandle, args: dict[str, Any]) -> None:
        self._handle = handle
        self._args = args
        self._rid: int | None = None
        self._call = _Call()
        self._finished = False
        self._killed = False
        #: The exit code, once the process has exited (128+N when killed by signal N).
        self.exit_code: int | None = None

    async def open(self) -> PtyProcess:
        """Start the process (done by ``async with``)."""
        h = self._handle
        if self._rid is not None:
            raise RuntimeError("this pty is open already")
        if h._error is not None:
            raise h._error
        rid = next(h._ids)
        h._calls[rid] = self._call
        self._rid = rid
        h._send({"id": rid, "op": "pty.open", "args": self._args, "more": True})
        await h._drain()
        return self

    async def __aenter__(self) -> PtyProcess:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _id(self) -> int:
        if self._rid is None:
            raise RuntimeError("this pty is not open")
        return self._rid

    async def send(self, data: bytes) -> None:
        """Write input (keystrokes) to the terminal."""
        rid = self._id()
        for i in range(0, len(data), CHUNK):
            self._handle._send({"id": rid, "type": "chunk"}, bytes(data[i : i + CHUNK]))
            await self._handle._drain()

    async def resize(self, cols: int, rows: int) -> None:
        """Change the terminal size (the foreground job gets SIGWINCH)."""
        await self._handle.request("pty.resize", {"pty": self._id(), "cols": cols, "rows": rows})

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._output()

    async def _output(self) -> AsyncIterator[bytes]:
        self._id()
        while not self._finished:
            item = await self._call.queue.get()
            if isinstance(item, BaseException):
                self._finish()
                raise item
            header, data = item
            kind = header.get("type")
            if kind == "error":
                self._finish()
                raise _error(header)
            if kind == "result":
                self.exit_code = int((header.get("data") or {})["exit_code"])
                self._finish()
                return
            if data:
                yield data

    def _finish(self) -> None:
        self._finished = True
        if self._rid is not None:
            self._handle._calls.pop(self._rid, None)

    async def wait(self) -> int:
        """Wait for the process to exit (discarding unread output); returns its exit code."""
        async for _ in self._output():
            pass
        if self.exit_code is None:  # pragma: no cover - the rocklet always sends a result
            raise RockletUnavailable("rocklet ended the pty without a result")
        return self.exit_code

    async def kill(self) -> None:
        """Ask the rocklet to kill the process tree; the exit code still ends the output."""
        if self._rid is None or self._finished or self._killed:
            return
        self._killed = True
        self._handle._send({"id": self._rid, "type": "end"})
        await self._handle._drain()

    async def close(self, timeout: float = 5.0) -> None:
        """Kill the process tree (unless it exited) and wait for the rocklet to confirm."""
        if self._rid is None or self._finished:
            return
        h = self._handle
        confirmed = False
        try:
            await self.kill()
            await asyncio.wait_for(self.wait(), timeout)
            confirmed = True
        except Exception:
            pass  # the rocklet is gone or did not answer: cancel below
        finally:
            if not confirmed:
                with contextlib.suppress(Exception):
                    h._send({"id": self._rid, "type": "cancel"})
            self._finish()


#: Per operation model: (the fields that are not frame arguments, its payload field, whether
#: that is an upload).
_PLANS: dict[type, tuple[set[str], str | None, bool]] = {}
#: Per operation model: its tag.
_TAGS: dict[type, str] = {}
#: Per (result type, model type): the result's fields that the model may fill, and how the
#: payload becomes its ``output`` ("encoded", "text" or None: it has none).
_FILL: dict[tuple[Any, type], tuple[tuple[str, ...], str | None]] = {}


def _tag(kind: type[Op[Any]]) -> str:
    tag = _TAGS.get(kind)
    if tag is None:
        tag = _TAGS[kind] = str(kind.model_fields["op"].default)
    return tag


def read_result(result: Any, operation: Any, data: dict[str, Any], payload: bytes) -> Any:
    """A reply (result data + payload) as ``result``, read by the result type's shape.

    - no result: None; ``bytes``: the payload;
    - data with ``stdout_len``: the payload is stdout then stderr (``stdout``, ``stderr``,
      ``encoding``); else a model with an ``output`` field: the payload is that output;
    - a result field the rocklet does not send is the operation's own field of that name
      (``FileWritten.path``).
    """
    if result is _NONE:
        return None
    if result is bytes:
        return payload
    key = (result, type(operation))
    plan = _FILL.get(key)
    if plan is None:
        fields = result.model_fields
        fill = tuple(name for name in fields if name in type(operation).model_fields)
        output = ("encoded" if "encoding" in fields else "text") if "output" in fields else None
        plan = _FILL[key] = (fill, output)
    fill, output = plan
    for name in fill:
        if name not in data:
            data[name] = getattr(operation, name)
    if "stdout_len" in data:
        n = data.pop("stdout_len")
        (stdout, stderr), encoding = encode_bytes(payload[:n], payload[n:])
        return result(stdout=stdout, stderr=stderr, encoding=encoding, **data)
    if output is not None and "output" not in data:
        if output == "encoded":
            (text,), encoding = encode_bytes(payload)
            return result(output=text, encoding=encoding, **data)
        return result(output=payload.decode("utf-8", "replace"), **data)
    return result(**data)


_NONE = type(None)


def _error(header: dict[str, Any]) -> Exception:
    """The typed error of a rocklet's error frame (its details kept)."""
    err = header.get("error") or {}
    details = err.get("details")
    return error_class(str(err.get("code")))(
        str(err.get("message", "")), **(details if isinstance(details, dict) else {})
    )


async def _chunks(blob: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(blob), CHUNK):
        yield blob[i : i + CHUNK]
