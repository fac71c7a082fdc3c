"""The SWE-ReX remote-runtime routes of the standalone rocklet app, and their helpers.

The routes are those ``swerex.server`` serves (``GET /``, ``GET /is_alive``,
``POST /create_session``, ``/run_in_session``, ``/close_session``, ``/execute``, ``/read_file``,
``/write_file``, ``/upload``, ``/close``), so that ``swerex.runtime.remote.RemoteRuntime`` and
SWE-agent work unmodified. Errors use SWE-ReX's shape: HTTP 511
``{"swerexception": {"message", "class_path", "traceback", "extra_info"}}``, where
``class_path`` only ever names a class from a fixed allow-list and ``traceback`` is always
empty; invalid bodies give FastAPI's 422 ``{"detail": [...]}``. A retried request (same
``X-Request-ID``) gets the first answer instead of running twice.

:mod:`rock_serve.rocklet.http` builds the app and mounts :meth:`SwerexRoutes.routes`.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import re
import tarfile
import tempfile
import time
import zipfile
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import IO, Any, Literal, TypeVar, cast

import anyio.to_thread
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rock_serve.errors import (
    FileNotFound,
    InvalidRequest,
    IsADirectory,
    NotADirectory,
    PathOutsideSandbox,
    PermissionDenied,
    RockError,
    SessionExists,
    SessionNotFound,
    Timeout,
)
from rock_serve.protocol import (
    DEFAULT_TIMEOUT,
    ExecRequest,
    OutputChunk,
    SessionCreateRequest,
    SessionRunRequest,
    SessionRunResult,
    decode_text,
)
from rock_serve.protocol.swerex import (
    SwxBashAction,
    SwxBashInterruptAction,
    SwxCloseSessionRequest,
    SwxCloseSessionResponse,
    SwxCommand,
    SwxCommandResponse,
    SwxCreateSessionRequest,
    SwxCreateSessionResponse,
    SwxObservation,
    SwxReadFileRequest,
    SwxWriteFileRequest,
)
from rock_serve.rocklet.handle import RockletHandle

# The app's logger: these routes were part of ``rock_serve.rocklet.http`` and log as it.
log = logging.getLogger("rock_serve.rocklet.http")

#: What SWE-ReX reports as ``expect_string`` when a command ran to its prompt.
PS1 = "SHELLPS1PREFIX"
#: Output caps for SWE-ReX routes (SWE-ReX has none; ours keep a frame under the agent's limit).
SESSION_OUTPUT_CAP = 32 << 20
EXEC_OUTPUT_CAP = 16 << 20
#: Longest a command started with ``is_interactive_command`` may keep running.
INTERACTIVE_LIFETIME = 86_400.0
#: Decode in a worker thread above this size, so the event loop never stalls.
THREAD_DECODE_BYTES = 1 << 20

_ANSI = re.compile(r"\x1B[@-_][0-?]*[ -/]*[@-~]")
_SYNTAX_ERROR = re.compile(r"(?m)^\S*bash: eval: line \d+: syntax error")
_SPAWN_ENOENT = re.compile(
    r"^(\[Errno 2\] No such file or directory: .*|env: .*: No such file.*)\n?$"
)

M = TypeVar("M", bound=BaseModel)


# ---------------------------------------------------------------------------- errors


# The only classes a SWE-ReX error response may name (the client imports ``class_path``).
SwxClass = Literal[
    "swerex.exceptions.SwerexException",
    "swerex.exceptions.NonZeroExitCodeError",
    "swerex.exceptions.CommandTimeoutError",
    "swerex.exceptions.SessionExistsError",
    "swerex.exceptions.SessionDoesNotExistError",
    "swerex.exceptions.BashIncorrectSyntaxError",
    "builtins.FileNotFoundError",
    "builtins.IsADirectoryError",
    "builtins.NotADirectoryError",
    "builtins.PermissionError",
    "builtins.ValueError",
    "builtins.LookupError",
    "builtins.TimeoutError",
]

#: Our typed errors -> SWE-ReX class paths, first match wins.
_SWX_FOR_ROCK: tuple[tuple[type[RockError], SwxClass], ...] = (
    (SessionExists, "swerex.exceptions.SessionExistsError"),
    (SessionNotFound, "swerex.exceptions.SessionDoesNotExistError"),
    (FileNotFound, "builtins.FileNotFoundError"),
    (IsADirectory, "builtins.IsADirectoryError"),
    (NotADirectory, "builtins.NotADirectoryError"),
    (PathOutsideSandbox, "builtins.PermissionError"),
    (PermissionDenied, "builtins.PermissionError"),
    (InvalidRequest, "builtins.ValueError"),
    (Timeout, "builtins.TimeoutError"),
)


class SwxError(Exception):
    """An error to send in SWE-ReX's shape; ``class_path`` comes from the allow-list."""

    def __init__(
        self, class_path: SwxClass, message: str, extra_info: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.class_path: SwxClass = class_path
        self.message = message
        self.extra_info = extra_info or {}


def _swx_error_for(exc: BaseException) -> SwxError:
    if isinstance(exc, SwxError):
        return exc
    if isinstance(exc, RockError):
        for cls, path in _SWX_FOR_ROCK:
            if isinstance(exc, cls):
                return SwxError(path, exc.message)
        return SwxError("swerex.exceptions.SwerexException", exc.message)
    if isinstance(exc, LookupError):  # unknown text encoding
        return SwxError("builtins.LookupError", str(exc))
    if isinstance(exc, ValueError):  # undecodable / unencodable text
        return SwxError("builtins.ValueError", str(exc))
    log.exception("rocklet http: unexpected error", exc_info=exc)
    return SwxError("swerex.exceptions.SwerexException", "internal error")


def _swx_body(exc: SwxError) -> bytes:
    body = {
        "swerexception": {
            "message": exc.message,
            "class_path": exc.class_path,
            "traceback": "",
            "extra_info": exc.extra_info,
        }
    }
    return json.dumps(body).encode()


def _validation_detail(exc: ValidationError) -> list[Any]:
    errors: list[Any] = json.loads(exc.json(include_url=False))
    for err in errors:
        err["loc"] = ["body", *err.get("loc", [])]
    return errors


# ---------------------------------------------------------------------------- helpers


def _clean_output(data: bytes) -> str:
    """Bytes -> SWE-ReX output text: undecodable bytes escaped, ANSI escapes gone, CRLF -> LF."""
    return _ANSI.sub("", data.decode("utf-8", "backslashreplace")).replace("\r\n", "\n")


async def _decode(data: bytes, encoding: str, errors: str) -> str:
    if len(data) > THREAD_DECODE_BYTES:
        return await anyio.to_thread.run_sync(codecs.decode, data, encoding, errors)
    return codecs.decode(data, encoding, errors)


class _JsonError(Exception):
    """A body that is not JSON (FastAPI answers 422)."""

    def __init__(self, detail: list[Any]) -> None:
        super().__init__("invalid body")
        self.detail = detail


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise _JsonError(
            [{"type": "json_invalid", "loc": ["body", 0], "msg": f"JSON decode error: {exc}"}]
        ) from None


def _no_session(name: str) -> SwxError:
    return SwxError(
        "swerex.exceptions.SessionDoesNotExistError", f"session {name!r} does not exist"
    )


def _swx_session_model(model: type[M], **fields: Any) -> M:
    """Build one of our models from SWE-ReX input; a bad field is SWE-ReX's ValueError."""
    try:
        return model(**fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors(include_url=False)
        )
        raise SwxError("builtins.ValueError", problems) from None


async def _iter_upload(upload: UploadFile, size: int = 1 << 20) -> AsyncIterator[bytes]:
    while True:
        chunk = await upload.read(size)
        if not chunk:
            return
        yield chunk


def _zip_to_tar(src: IO[bytes], dst: IO[bytes]) -> None:
    """Rewrite a zip archive as a tar stream, sanitising names like ``ZipFile.extractall``."""
    src.seek(0)
    with zipfile.ZipFile(src) as zf, tarfile.open(fileobj=dst, mode="w|") as tar:
        for info in zf.infolist():
            parts = [
                p for p in info.filename.replace("\\", "/").split("/") if p not in ("", ".", "..")
            ]
            if parts and parts[0].endswith(":"):  # a drive letter
                parts = parts[1:]
            if not parts:
                continue
            ti = tarfile.TarInfo("/".join(parts))
            ti.mtime = time.mktime((*info.date_time, 0, 0, -1))
            perm = (info.external_attr >> 16) & 0o777
            if info.is_dir():
                ti.type = tarfile.DIRTYPE
                ti.mode = perm or 0o755
                tar.addfile(ti)
            else:
                ti.size = info.file_size
                ti.mode = perm or 0o644
                with zf.open(info) as f:
                    tar.addfile(ti, f)


async def _zip_as_tar(src: IO[bytes]) -> AsyncIterator[bytes]:
    """The tar stream of a zip file, converted in a worker thread."""
    spool: IO[bytes] = cast(IO[bytes], tempfile.SpooledTemporaryFile(max_size=8 << 20))
    try:
        try:
            await anyio.to_thread.run_sync(_zip_to_tar, src, spool)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
            raise InvalidRequest(f"bad zip file: {exc}") from None
        await anyio.to_thread.run_sync(spool.seek, 0)
        while True:
            chunk = await anyio.to_thread.run_sync(spool.read, 1 << 20)
            if not chunk:
                return
            yield chunk
    finally:
        spool.close()


# ---------------------------------------------------------------------------- state


class _Idempotency:
    """Remembers recent responses by ``X-Request-ID`` (SWE-ReX's retry key).

    A retry of a finished request gets the stored response; a retry of one still running
    waits for it instead of running the command twice.
    """

    def __init__(self, max_entries: int = 64, max_bytes: int = 16 << 20) -> None:
        self._entries: OrderedDict[str, asyncio.Future[tuple[int, bytes]]] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes

    def _size(self) -> int:
        return sum(len(f.result()[1]) for f in self._entries.values() if f.done())

    async def run(
        self, key: str, produce: Callable[[], Awaitable[tuple[int, bytes]]]
    ) -> tuple[int, bytes]:
        while True:
            fut = self._entries.get(key)
            if fut is None:
                break
            self._entries.move_to_end(key)
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                if not fut.cancelled():
                    raise
                # The first attempt was cancelled before it finished: run it ourselves.
        fut = asyncio.get_running_loop().create_future()
        self._entries[key] = fut
        try:
            result = await produce()
        except BaseException:
            if self._entries.get(key) is fut:
                del self._entries[key]
            fut.cancel()
            raise
        fut.set_result(result)
        while len(self._entries) > self._max_entries or (
            len(self._entries) > 1 and self._size() > self._max_bytes
        ):
            self._entries.popitem(last=False)
        return result


class _Background:
    """A command left running in a session (``is_interactive_command``), read as it goes."""

    def __init__(self, stream: AsyncIterator[OutputChunk | SessionRunResult]) -> None:
        self.buf = bytearray()
        self.result: SessionRunResult | None = None
        self.error: BaseException | None = None
        self.changed = asyncio.Event()
        self.task = asyncio.ensure_future(self._consume(stream))

    async def _consume(self, stream: AsyncIterator[OutputChunk | SessionRunResult]) -> None:
        try:
            async for item in stream:
                if isinstance(item, OutputChunk):
                    self.buf += _chunk_bytes(item)
                else:
                    self.result = item
                self.changed.set()
        except Exception as exc:
            self.error = exc
        finally:
            self.changed.set()

    @property
    def done(self) -> bool:
        return self.task.done()

    async def wait(self, expect: list[str], timeout: float) -> tuple[str, str]:
        """Wait for one of ``expect`` in new output, or the end; returns (output, matched)."""
        deadline = time.monotonic() + timeout
        needles = [(e, e.encode()) for e in expect if e]
        while True:
            new = bytes(self.buf)
            hits = [(new.find(b), e, b) for e, b in needles if b in new]
            if hits:
                at, text, needle = min(hits)
                del self.buf[: at + len(needle)]
                return _clean_output(new[:at]), text
            if self.done:
                self.buf.clear()
                if self.error is not None and self.result is None:
                    raise self.error
                return _clean_output(new), PS1
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise SwxError(
                    "swerex.exceptions.CommandTimeoutError",
                    f"timeout after {timeout} seconds while waiting for output",
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    async def cancel(self) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


def _chunk_bytes(chunk: OutputChunk) -> bytes:
    return decode_text(chunk.data, chunk.encoding)


# ---------------------------------------------------------------------------- routes


def _run_request(action: SwxBashAction, timeout: float) -> SessionRunRequest:
    """Our session run for a SWE-ReX bash action."""
    return _swx_session_model(
        SessionRunRequest,
        session=action.session,
        command=action.command,
        timeout=timeout,
        max_output_bytes=SESSION_OUTPUT_CAP,
    )


class SwerexRoutes:
    """The SWE-ReX endpoints and their state: background commands and the retry cache.

    Args:
        handle: Returns the live rocklet handle (the app's, possibly restarted).
    """

    def __init__(self, handle: Callable[[], Awaitable[RockletHandle]]) -> None:
        self.handle = handle
        self.background: dict[str, _Background] = {}
        self.running: dict[str, int] = {}
        self.idempotency = _Idempotency()

    def routes(self) -> list[Route]:
        """The SWE-ReX routes, each wrapped by :meth:`wrap`."""
        w = self.wrap
        return [
            Route("/", w(self.swx_root), methods=["GET"]),
            Route("/is_alive", w(self.swx_is_alive), methods=["GET"]),
            Route("/create_session", w(self.swx_create_session), methods=["POST"]),
            Route("/run_in_session", w(self.swx_run_in_session), methods=["POST"]),
            Route("/close_session", w(self.swx_close_session), methods=["POST"]),
            Route("/execute", w(self.swx_execute), methods=["POST"]),
            Route("/read_file", w(self.swx_read_file), methods=["POST"]),
            Route("/write_file", w(self.swx_write_file), methods=["POST"]),
            Route("/upload", w(self.swx_upload), methods=["POST"]),
            Route("/close", w(self.swx_close), methods=["POST"]),
        ]

    async def cancel_background(self) -> None:
        """Cancel every command left running by ``is_interactive_command``."""
        for bg in list(self.background.values()):
            await bg.cancel()
        self.background.clear()

    def wrap(
        self, fn: Callable[[Request], Awaitable[BaseModel | Mapping[str, Any]]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a SWE-ReX endpoint: request-id cache, 422 on bad bodies, 511 on errors."""

        async def produce(request: Request) -> tuple[int, bytes]:
            try:
                result = await fn(request)
            except ValidationError as exc:
                body = json.dumps({"detail": _validation_detail(exc)}).encode()
                return 422, body
            except _JsonError as exc:
                return 422, json.dumps({"detail": exc.detail}).encode()
            except Exception as exc:
                err = _swx_error_for(exc)
                return 511, _swx_body(err)
            if isinstance(result, BaseModel):
                return 200, result.model_dump_json().encode()
            return 200, json.dumps(result).encode()

        async def endpoint(request: Request) -> Response:
            key = request.headers.get("x-request-id")
            if key:
                status, body = await self.idempotency.run(key, lambda: produce(request))
            else:
                status, body = await produce(request)
            return Response(body, status_code=status, media_type="application/json")

        return endpoint

    async def swx_root(self, request: Request) -> Mapping[str, Any]:
        return {"message": "hello world"}

    async def swx_is_alive(self, request: Request) -> Mapping[str, Any]:
        try:
            await asyncio.wait_for((await self.handle()).ping(), 5)
        except (RockError, asyncio.TimeoutError) as exc:
            return {"is_alive": False, "message": f"rocklet not answering: {exc}"}
        return {"is_alive": True, "message": ""}

    async def swx_create_session(self, request: Request) -> BaseModel:
        req = SwxCreateSessionRequest.model_validate(await _json_body(request))
        ours = _swx_session_model(
            SessionCreateRequest,
            session=req.session,
            startup_commands=[f"source {path}" for path in req.startup_source],
        )
        h = await self.handle()
        try:
            resp = await h.create_session(ours)
        except SessionExists:
            raise SwxError(
                "swerex.exceptions.SessionExistsError", f"session {req.session} already exists"
            ) from None
        return SwxCreateSessionResponse(output=resp.output)

    async def swx_run_in_session(self, request: Request) -> BaseModel:
        body = await _json_body(request)
        tag = body.get("action_type", "bash") if isinstance(body, dict) else "bash"
        if tag == "bash_interrupt":
            return await self._interrupt(SwxBashInterruptAction.model_validate(body))
        return await self._run(SwxBashAction.model_validate(body))

    async def _run(self, action: SwxBashAction) -> SwxObservation:
        bg = self.background.get(action.session)
        if bg is not None and bg.done:
            del self.background[action.session]
            bg = None
        if bg is not None or action.is_interactive_command or action.is_interactive_quit:
            return await self._run_interactive(action, bg)
        timeout = action.timeout if action.timeout is not None else DEFAULT_TIMEOUT
        req = _run_request(action, timeout)
        h = await self.handle()
        self.running[action.session] = self.running.get(action.session, 0) + 1
        try:
            res = await h.run_in_session(req)
        except SessionNotFound:
            raise _no_session(action.session) from None
        finally:
            left = self.running[action.session] - 1
            if left:
                self.running[action.session] = left
            else:
                del self.running[action.session]
        if res.timed_out:
            raise SwxError(
                "swerex.exceptions.CommandTimeoutError",
                f"timeout after {action.timeout} seconds while running command {action.command!r}",
            )
        output = res.output_bytes()
        text = (
            await anyio.to_thread.run_sync(_clean_output, output)
            if len(output) > THREAD_DECODE_BYTES
            else _clean_output(output)
        )
        if res.exit_code == 2 and _SYNTAX_ERROR.search(text):
            # SWE-ReX checks syntax with ``bash -n`` first; bash's own parse error is ours.
            raise SwxError(
                "swerex.exceptions.BashIncorrectSyntaxError",
                f"Error (exit code 2) while checking bash command \n{action.command!r}\n"
                f"---- Stderr ----\n{text}\n---- Stdout ----\n",
                {"bash_stdout": "", "bash_stderr": text},
            )
        if action.check == "ignore":
            return SwxObservation(output=text, exit_code=None, expect_string=PS1)
        if action.check == "raise" and res.exit_code != 0:
            msg = (
                f"Command {action.command!r} failed with exit code {res.exit_code}. "
                f"Here is the output:\n{text!r}"
            )
            if action.error_msg:
                msg = f"{action.error_msg}: {msg}"
            raise SwxError("swerex.exceptions.NonZeroExitCodeError", msg)
        return SwxObservation(output=text, exit_code=res.exit_code, expect_string=PS1)

    async def _run_interactive(
        self, action: SwxBashAction, bg: _Background | None
    ) -> SwxObservation:
        h = await self.handle()
        timeout = action.timeout if action.timeout is not None else DEFAULT_TIMEOUT
        if bg is None:
            bg = _Background(h.stream_in_session(_run_request(action, INTERACTIVE_LIFETIME)))
            self.background[action.session] = bg
        else:
            try:
                await h.session_stdin(action.session, (action.command + "\n").encode())
            except SessionNotFound:
                raise _no_session(action.session) from None
        try:
            output, matched = await bg.wait(action.expect, timeout)
        except SessionNotFound:
            raise _no_session(action.session) from None
        except SwxError as exc:
            if exc.class_path == "swerex.exceptions.CommandTimeoutError":
                exc.message = (
                    f"timeout after {action.timeout} seconds while running command "
                    f"{action.command!r}"
                )
            raise
        finally:
            if bg.done and self.background.get(action.session) is bg:
                del self.background[action.session]
        if not action.is_interactive_quit:
            output = output.strip()
        return SwxObservation(output=output, exit_code=0, expect_string=matched)

    async def _interrupt(self, action: SwxBashInterruptAction) -> SwxObservation:
        h = await self.handle()
        bg = self.background.get(action.session)
        for _ in range(max(action.n_retry, 1)):
            try:
                await h.interrupt_session(action.session)
            except SessionNotFound:
                raise _no_session(action.session) from None
            if bg is not None:
                try:
                    output, matched = await bg.wait(action.expect, action.timeout)
                except SwxError:
                    continue
                if bg.done and self.background.get(action.session) is bg:
                    del self.background[action.session]
                return SwxObservation(output=output.strip(), exit_code=0, expect_string=matched)
            deadline = time.monotonic() + action.timeout
            while action.session in self.running and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            if action.session not in self.running:
                return SwxObservation(output="", exit_code=0, expect_string=PS1)
        raise SwxError("swerex.exceptions.SwerexException", "Failed to interrupt session")

    async def swx_close_session(self, request: Request) -> BaseModel:
        req = SwxCloseSessionRequest.model_validate(await _json_body(request))
        bg = self.background.pop(req.session, None)
        h = await self.handle()
        try:
            await h.close_session(req.session)
        except SessionNotFound:
            raise _no_session(req.session) from None
        finally:
            if bg is not None:
                await bg.cancel()
        return SwxCloseSessionResponse()

    async def swx_execute(self, request: Request) -> BaseModel:
        cmd = SwxCommand.model_validate(await _json_body(request))
        if isinstance(cmd.command, str):
            argv = ["/bin/sh", "-c", cmd.command] if cmd.shell else [cmd.command]
        else:
            if not cmd.command:
                raise SwxError("builtins.ValueError", "command must not be empty")
            argv = ["/bin/sh", "-c", *cmd.command] if cmd.shell else list(cmd.command)
        if cmd.merge_output_streams:
            argv = ["/bin/sh", "-c", 'exec "$@" 2>&1', "sh", *argv]
        if cmd.env is not None:  # subprocess semantics: env replaces the environment
            argv = ["env", "-i", *(f"{k}={v}" for k, v in cmd.env.items()), *argv]
        timeout = cmd.timeout if cmd.timeout is not None else DEFAULT_TIMEOUT
        req = ExecRequest(
            command=argv,
            shell=False,
            cwd=cmd.cwd,
            timeout=timeout,
            max_output_bytes=EXEC_OUTPUT_CAP,
        )
        res = await (await self.handle()).exec(req)
        if res.timed_out:
            raise SwxError(
                "swerex.exceptions.CommandTimeoutError",
                f"Timeout ({cmd.timeout}s) exceeded while running command",
            )
        stdout = res.stdout_bytes().decode("utf-8", "backslashreplace")
        stderr = res.stderr_bytes().decode("utf-8", "backslashreplace")
        if (
            res.exit_code == 127
            and not cmd.shell
            and not stdout
            and _SPAWN_ENOENT.match(stderr)
            and res.duration < 5
        ):
            name = cmd.command if isinstance(cmd.command, str) else cmd.command[0]
            raise SwxError(
                "builtins.FileNotFoundError", f"[Errno 2] No such file or directory: {name!r}"
            )
        if cmd.check and res.exit_code != 0:
            msg = (
                f"Command {cmd.command!r} failed with exit code {res.exit_code}. "
                f"Stdout:\n{stdout!r}\nStderr:\n{stderr!r}"
            )
            if cmd.error_msg:
                msg = f"{cmd.error_msg}: {msg}"
            raise SwxError("swerex.exceptions.NonZeroExitCodeError", msg)
        return SwxCommandResponse(stdout=stdout, stderr=stderr, exit_code=res.exit_code)

    async def swx_read_file(self, request: Request) -> Mapping[str, Any]:
        req = SwxReadFileRequest.model_validate(await _json_body(request))
        data = await (await self.handle()).read_file(req.path)
        text = await _decode(data, req.encoding or "utf-8", req.errors or "strict")
        # Path.read_text reads in text mode: universal newlines.
        return {"content": text.replace("\r\n", "\n").replace("\r", "\n")}

    async def swx_write_file(self, request: Request) -> Mapping[str, Any]:
        req = SwxWriteFileRequest.model_validate(await _json_body(request))
        data = req.content.encode("utf-8")
        await (await self.handle()).write_file(req.path, data, make_parents=True)
        return {}

    async def swx_upload(self, request: Request) -> Mapping[str, Any]:
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("file")
            target = form.get("target_path")
            unzip = str(form.get("unzip", "false")).strip().lower()
            if not isinstance(upload, UploadFile) or not isinstance(target, str) or not target:
                raise _JsonError(
                    [
                        {
                            "type": "missing",
                            "loc": [
                                "body",
                                "file" if not isinstance(upload, UploadFile) else "target_path",
                            ],
                            "msg": "Field required",
                        }
                    ]
                )
            h = await self.handle()
            if unzip in ("true", "1", "yes", "on"):
                await h.upload_tar(target, _zip_as_tar(upload.file))
            else:
                await h.write_file(target, _iter_upload(upload), make_parents=True)
        return {}

    async def swx_close(self, request: Request) -> Mapping[str, Any]:
        await self.cancel_background()
        h = await self.handle()
        for name in await h.list_sessions():
            with contextlib.suppress(SessionNotFound):
                await h.close_session(name)
        return {}
