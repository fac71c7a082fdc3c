"""Standalone HTTP mode of the rocklet: a Starlette app in front of one :class:`RockletHandle`.

Two route families share one app:

- The **SWE-ReX remote-runtime protocol**, exactly as ``swerex.server`` serves it (``GET /``,
  ``GET /is_alive``, ``POST /create_session``, ``/run_in_session``, ``/close_session``,
  ``/execute``, ``/read_file``, ``/write_file``, ``/upload``, ``/close``), so that
  ``swerex.runtime.remote.RemoteRuntime`` and SWE-agent work unmodified. Errors use SWE-ReX's
  shape: HTTP 511 ``{"swerexception": {"message", "class_path", "traceback", "extra_info"}}``,
  where ``class_path`` only ever names a class from a fixed allow-list and ``traceback`` is
  always empty; invalid bodies give FastAPI's 422 ``{"detail": [...]}``.
- **``/rock/v1/...``** for what that protocol lacks: streamed runs (NDJSON of
  :class:`~rock_serve.protocol.OutputChunk` lines, then the result), raw binary file and tar
  transfer streamed both ways, stdin, interrupt, stats and our own exec. Errors use the one
  error body ``{"error": {"code", "message"}}`` with the status from :mod:`rock_serve.errors`.

Authentication: when a token is set, every request needs the header ``X-API-Key: <token>``
(compared in constant time); otherwise 401.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hmac
import json
import logging
import re
import tarfile
import tempfile
import time
import zipfile
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import IO, Any, Literal, TypeVar, cast

import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rock_serve.errors import (
    FileNotFound,
    InternalError,
    InvalidRequest,
    IsADirectory,
    NotADirectory,
    PathOutsideSandbox,
    PermissionDenied,
    RockError,
    RockletUnavailable,
    SessionExists,
    SessionNotFound,
    Timeout,
    Unauthorized,
    to_body,
)
from rock_serve.protocol import (
    DEFAULT_TIMEOUT,
    ExecRequest,
    MkdirRequest,
    OutputChunk,
    ReadFileRequest,
    RemoveRequest,
    SessionCloseRequest,
    SessionCreateRequest,
    SessionInterruptRequest,
    SessionRunRequest,
    SessionRunResult,
    SessionStdinRequest,
    decode_text,
)
from rock_serve.rocklet.handle import RockletHandle

__all__ = ["HandleFactory", "create_app"]

log = logging.getLogger(__name__)

#: An async callable that starts a rocklet and returns a handle to it.
HandleFactory = Callable[[], Awaitable[RockletHandle]]

#: Prefix of the routes that are ours rather than SWE-ReX's.
ROCK_PREFIX = "/rock/v1"

#: What SWE-ReX reports as ``expect_string`` when a command ran to its prompt.
PS1 = "SHELLPS1PREFIX"
#: Output caps for SWE-ReX routes (SWE-ReX has none; ours keep a frame under the agent's limit).
SESSION_OUTPUT_CAP = 32 << 20
EXEC_OUTPUT_CAP = 16 << 20
#: Longest a command started with ``is_interactive_command`` may keep running.
INTERACTIVE_LIFETIME = 86_400.0
#: How long a streamed route waits for its first item before it sends the headers.
FIRST_ITEM_WAIT = 0.2
#: Decode in a worker thread above this size, so the event loop never stalls.
THREAD_DECODE_BYTES = 1 << 20

_ANSI = re.compile(r"\x1B[@-_][0-?]*[ -/]*[@-~]")
_SYNTAX_ERROR = re.compile(r"(?m)^\S*bash: eval: line \d+: syntax error")
_SPAWN_ENOENT = re.compile(
    r"^(\[Errno 2\] No such file or directory: .*|env: .*: No such file.*)\n?$"
)

M = TypeVar("M", bound=BaseModel)


# ---------------------------------------------------------------------------- SWE-ReX models
# Mirrors of ``swerex.runtime.abstract`` (v1.4): same fields and defaults; unknown fields are
# ignored as there, so clients that add fields (ROCK's ``sandbox_id``) keep working.


class _SwxModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SwxCreateSessionRequest(_SwxModel):
    """SWE-ReX ``CreateBashSessionRequest``."""

    startup_source: list[str] = Field(default_factory=list, description="Files to source.")
    session: str = Field(default="default", description="Session name.")
    session_type: Literal["bash"] = Field(default="bash", description="Only 'bash'.")
    startup_timeout: float = Field(default=1.0, description="Timeout of the startup commands.")


class SwxCreateSessionResponse(_SwxModel):
    """SWE-ReX ``CreateBashSessionResponse``."""

    output: str = Field(default="", description="Output of the startup commands.")
    session_type: Literal["bash"] = Field(default="bash", description="Tag.")


class SwxBashAction(_SwxModel):
    """SWE-ReX ``BashAction``."""

    command: str = Field(description="The command to run.")
    session: str = Field(default="default", description="Session name.")
    timeout: float | None = Field(default=None, description="Seconds; None means the default.")
    is_interactive_command: bool = Field(default=False, description="Input for a running program.")
    is_interactive_quit: bool = Field(default=False, description="Input that ends that program.")
    check: Literal["silent", "raise", "ignore"] = Field(default="raise", description="Exit code.")
    error_msg: str = Field(default="", description="Prefix of the NonZeroExitCodeError message.")
    expect: list[str] = Field(default_factory=list, description="Extra strings to wait for.")
    action_type: Literal["bash"] = Field(default="bash", description="Tag.")


class SwxBashInterruptAction(_SwxModel):
    """SWE-ReX ``BashInterruptAction``."""

    session: str = Field(default="default", description="Session name.")
    timeout: float = Field(default=0.2, description="Seconds to wait per attempt.")
    n_retry: int = Field(default=3, description="Attempts.")
    expect: list[str] = Field(default_factory=list, description="Extra strings to wait for.")
    action_type: Literal["bash_interrupt"] = Field(default="bash_interrupt", description="Tag.")


class SwxObservation(_SwxModel):
    """SWE-ReX ``BashObservation``."""

    output: str = Field(default="", description="Merged output.")
    exit_code: int | None = Field(default=None, description="Exit code, None when not checked.")
    failure_reason: str = Field(default="", description="Unused.")
    expect_string: str = Field(default="", description="Which expect string ended the wait.")
    session_type: Literal["bash"] = Field(default="bash", description="Tag.")


class SwxCloseSessionRequest(_SwxModel):
    """SWE-ReX ``CloseBashSessionRequest``."""

    session: str = Field(default="default", description="Session name.")
    session_type: Literal["bash"] = Field(default="bash", description="Tag.")


class SwxCloseSessionResponse(_SwxModel):
    """SWE-ReX ``CloseBashSessionResponse``."""

    session_type: Literal["bash"] = Field(default="bash", description="Tag.")


class SwxCommand(_SwxModel):
    """SWE-ReX ``Command`` (``subprocess.run`` semantics)."""

    command: str | list[str] = Field(description="Argv list, or a string with shell=True.")
    timeout: float | None = Field(default=None, description="Seconds; None means the default.")
    shell: bool = Field(default=False, description="Run through /bin/sh -c.")
    check: bool = Field(default=False, description="Raise NonZeroExitCodeError on failure.")
    error_msg: str = Field(default="", description="Prefix of that error's message.")
    env: dict[str, str] | None = Field(default=None, description="The whole environment.")
    cwd: str | None = Field(default=None, description="Working directory.")
    merge_output_streams: bool = Field(default=False, description="stderr into stdout.")


class SwxCommandResponse(_SwxModel):
    """SWE-ReX ``CommandResponse``."""

    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None


class SwxReadFileRequest(_SwxModel):
    """SWE-ReX ``ReadFileRequest`` (``Path.read_text`` semantics)."""

    path: str = Field(description="Path to read.")
    encoding: str | None = Field(default=None, description="Text encoding (default UTF-8).")
    errors: str | None = Field(default=None, description="Decoding error handler.")


class SwxWriteFileRequest(_SwxModel):
    """SWE-ReX ``WriteFileRequest``."""

    content: str = Field(description="Text to write (UTF-8).")
    path: str = Field(description="Path to write; parents are created.")


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


def _model_response(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def _json_response(data: Mapping[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(data), status_code=status, media_type="application/json")


def _rock_error_response(exc: BaseException) -> Response:
    if not isinstance(exc, RockError):
        log.exception("rocklet http: unexpected error", exc_info=exc)
        exc = InternalError("internal error")
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(to_body(exc), status_code=exc.status, headers=headers)


def _parse(model: type[M], raw: bytes | Mapping[str, Any]) -> M:
    """Validate a body or query against ``model``; problems raise :class:`InvalidRequest`."""
    try:
        if isinstance(raw, bytes | bytearray):
            return model.model_validate_json(raw or b"{}")
        return model.model_validate(dict(raw))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors(include_url=False)
        )
        raise InvalidRequest(f"invalid {model.__name__}: {problems}") from None


def _query_path(request: Request) -> str:
    path = request.query_params.get("path", "")
    if not path or len(path) > 4096 or "\0" in path:
        raise InvalidRequest("query parameter 'path' must be a path of 1 to 4096 characters")
    return path


async def _decode(data: bytes, encoding: str, errors: str) -> str:
    if len(data) > THREAD_DECODE_BYTES:
        return await anyio.to_thread.run_sync(codecs.decode, data, encoding, errors)
    return codecs.decode(data, encoding, errors)


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


# ---------------------------------------------------------------------------- middleware


class _AuthMiddleware:
    """Checks ``X-API-Key`` in constant time; 401 in the shape of the route family."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given: bytes | None = None
        for name, value in scope.get("headers", ()):
            if name == b"x-api-key":
                given = value
                break
        if given is not None and hmac.compare_digest(given, self.token):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        response: Response
        if path.startswith(ROCK_PREFIX + "/") or path == ROCK_PREFIX:
            response = _rock_error_response(Unauthorized("missing or wrong X-API-Key header"))
        elif given is None:
            response = JSONResponse(
                {"detail": "Not authenticated"},
                status_code=401,
                headers={"WWW-Authenticate": "APIKey"},
            )
        else:
            response = JSONResponse({"detail": "Invalid API Key"}, status_code=401)
        await response(scope, receive, send)


# ---------------------------------------------------------------------------- the app


class _Rocklet:
    """The state behind the app: the handle, background commands and the retry cache."""

    def __init__(self, source: RockletHandle | HandleFactory) -> None:
        if isinstance(source, RockletHandle):
            self._handle: RockletHandle | None = source
            self._factory: HandleFactory | None = None
        else:
            self._handle = None
            self._factory = source
        self._lock = asyncio.Lock()
        self.background: dict[str, _Background] = {}
        self.running: dict[str, int] = {}
        self.idempotency = _Idempotency()

    async def handle(self) -> RockletHandle:
        """The live handle; with a factory, a dead rocklet is replaced by a new one."""
        h = self._handle
        if h is not None and h.alive:
            return h
        if self._factory is None:
            if h is None:  # pragma: no cover - the constructor sets it
                raise RockletUnavailable("no rocklet")
            return h  # its calls raise RockletUnavailable
        async with self._lock:
            if self._handle is not None and self._handle.alive:
                return self._handle
            if self._handle is not None:
                with contextlib.suppress(Exception):
                    await self._handle.close()
                self._handle = None
            self.background.clear()
            self._handle = await self._factory()
            return self._handle

    async def shutdown(self) -> None:
        for bg in list(self.background.values()):
            await bg.cancel()
        self.background.clear()
        if self._factory is not None and self._handle is not None:
            await self._handle.close()
            self._handle = None

    # ------------------------------------------------------------------ SWE-ReX routes

    def swerex(
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
        req = _swx_session_model(
            SessionRunRequest,
            session=action.session,
            command=action.command,
            timeout=timeout,
            max_output_bytes=SESSION_OUTPUT_CAP,
        )
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
            req = _swx_session_model(
                SessionRunRequest,
                session=action.session,
                command=action.command,
                timeout=INTERACTIVE_LIFETIME,
                max_output_bytes=SESSION_OUTPUT_CAP,
            )
            bg = _Background(h.stream_in_session(req))
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
        for bg in list(self.background.values()):
            await bg.cancel()
        self.background.clear()
        h = await self.handle()
        for name in await h.list_sessions():
            with contextlib.suppress(SessionNotFound):
                await h.close_session(name)
        return {}

    # ------------------------------------------------------------------ /rock/v1 routes

    def rock(
        self, fn: Callable[[Request], Awaitable[Response | BaseModel | None]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap one of our endpoints: typed errors become the one error body."""

        async def endpoint(request: Request) -> Response:
            try:
                result = await fn(request)
            except Exception as exc:
                return _rock_error_response(exc)
            if result is None:
                return Response(status_code=204)
            if isinstance(result, BaseModel):
                return _model_response(result)
            return result

        return endpoint

    async def rock_create_session(self, request: Request) -> BaseModel:
        req = _parse(SessionCreateRequest, await request.body())
        return await (await self.handle()).create_session(req)

    async def rock_run(self, request: Request) -> BaseModel:
        req = _parse(SessionRunRequest, await request.body())
        return await (await self.handle()).run_in_session(req)

    async def rock_run_stream(self, request: Request) -> Response:
        req = _parse(SessionRunRequest, await request.body())
        h = await self.handle()
        if req.session not in await h.list_sessions():  # a 404 even if the agent is slow
            raise SessionNotFound(f"no session named {req.session!r}")
        return await _ndjson(h.stream_in_session(req))

    async def rock_stdin(self, request: Request) -> None:
        req = _parse(SessionStdinRequest, await request.body())
        await (await self.handle()).session_stdin(req.session, req.data.encode(), eof=req.eof)

    async def rock_interrupt(self, request: Request) -> None:
        req = _parse(SessionInterruptRequest, await request.body())
        await (await self.handle()).interrupt_session(req.session)

    async def rock_close_session(self, request: Request) -> None:
        req = _parse(SessionCloseRequest, await request.body())
        bg = self.background.pop(req.session, None)
        try:
            await (await self.handle()).close_session(req.session)
        finally:
            if bg is not None:
                await bg.cancel()

    async def rock_exec(self, request: Request) -> BaseModel:
        req = _parse(ExecRequest, await request.body())
        return await (await self.handle()).exec(req)

    async def rock_exec_stream(self, request: Request) -> Response:
        req = _parse(ExecRequest, await request.body())
        h = await self.handle()
        return await _ndjson(h.stream_exec(req))

    async def rock_read(self, request: Request) -> Response:
        req = _parse(ReadFileRequest, request.query_params)
        h = await self.handle()
        if req.offset or req.length is not None:
            data = await h.read_file(req.path, offset=req.offset, length=req.length)
            return Response(data, media_type="application/octet-stream")
        return await _raw_stream(h.iter_file(req.path), "application/octet-stream")

    async def rock_write(self, request: Request) -> BaseModel:
        path = _query_path(request)
        mode_text = request.query_params.get("mode")
        mode: int | None = None
        if mode_text:
            try:
                mode = int(mode_text, 8)
            except ValueError:
                raise InvalidRequest("query parameter 'mode' must be octal, e.g. 644") from None
            if not 0 <= mode <= 0o7777:
                raise InvalidRequest("query parameter 'mode' must be between 0 and 7777")
        parents = request.query_params.get("make_parents", "true").lower() != "false"
        h = await self.handle()
        await h.write_file(path, _iter_body(request), mode=mode, make_parents=parents)
        return await h.stat(path)

    async def rock_stat(self, request: Request) -> BaseModel:
        return await (await self.handle()).stat(_query_path(request))

    async def rock_list(self, request: Request) -> BaseModel:
        return await (await self.handle()).list_dir(_query_path(request))

    async def rock_mkdir(self, request: Request) -> None:
        req = _parse(MkdirRequest, await request.body())
        await (await self.handle()).mkdir(req.path, parents=req.parents, exist_ok=req.exist_ok)

    async def rock_remove(self, request: Request) -> None:
        req = _parse(RemoveRequest, await request.body())
        h = await self.handle()
        await h.remove(req.path, recursive=req.recursive, missing_ok=req.missing_ok)

    async def rock_tar_download(self, request: Request) -> Response:
        h = await self.handle()
        return await _raw_stream(h.download_tar(_query_path(request)), "application/x-tar")

    async def rock_tar_upload(self, request: Request) -> None:
        path = _query_path(request)
        await (await self.handle()).upload_tar(path, _iter_body(request))

    async def rock_stats(self, request: Request) -> BaseModel:
        return await (await self.handle()).stats()


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


async def _iter_body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


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


async def _raw_stream(it: AsyncIterator[bytes], media_type: str) -> Response:
    """Stream bytes; an error before the first chunk becomes a normal error response."""
    iterator = aiter(it)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        return Response(b"", media_type=media_type)

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in iterator:
                yield chunk
        finally:
            await cast(Any, iterator).aclose()

    return StreamingResponse(body(), media_type=media_type)


async def _ndjson(it: AsyncIterator[BaseModel]) -> Response:
    """Stream models as NDJSON lines; an error mid-stream is sent as an error-body line.

    The headers wait up to :data:`FIRST_ITEM_WAIT` for the first item, so an immediate error
    (no such session) still gets its own status code.
    """
    iterator = aiter(it)
    first: asyncio.Future[BaseModel] = asyncio.ensure_future(anext(iterator))
    await asyncio.wait({first}, timeout=FIRST_ITEM_WAIT)
    if first.done():
        exc = first.exception()
        if isinstance(exc, StopAsyncIteration):
            return Response(b"", media_type="application/x-ndjson")
        if exc is not None:
            return _rock_error_response(exc)

    async def body() -> AsyncIterator[bytes]:
        try:
            try:
                item = await asyncio.shield(first)
                yield item.model_dump_json().encode() + b"\n"
                async for item in iterator:
                    yield item.model_dump_json().encode() + b"\n"
            except StopAsyncIteration:
                return
            except RockError as exc:
                yield json.dumps(to_body(exc)).encode() + b"\n"
        finally:
            if not first.done():
                first.cancel()
                with contextlib.suppress(BaseException):
                    await first
            with contextlib.suppress(RuntimeError):
                await cast(Any, iterator).aclose()

    return StreamingResponse(body(), media_type="application/x-ndjson")


def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith(ROCK_PREFIX):
        code = "not_found" if exc.status_code == 404 else "invalid_request"
        body = {
            "error": {"code": code, "message": f"{exc.detail}: {request.method} {request.url.path}"}
        }
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def create_app(source: RockletHandle | HandleFactory, *, token: str | None) -> Starlette:
    """Build the HTTP app in front of one rocklet.

    Args:
        source: A connected :class:`RockletHandle` (the caller owns and closes it), or an
            async factory that starts one. With a factory the app owns its rocklet: it starts
            it at startup (or on first use), replaces it if it dies, and closes it at shutdown.
        token: When set, every request must carry ``X-API-Key: <token>``.

    Returns:
        A Starlette app serving the SWE-ReX routes and ``/rock/v1/...``.
    """
    r = _Rocklet(source)
    swx, rock = r.swerex, r.rock
    p = ROCK_PREFIX
    routes = [
        Route("/", swx(r.swx_root), methods=["GET"]),
        Route("/is_alive", swx(r.swx_is_alive), methods=["GET"]),
        Route("/create_session", swx(r.swx_create_session), methods=["POST"]),
        Route("/run_in_session", swx(r.swx_run_in_session), methods=["POST"]),
        Route("/close_session", swx(r.swx_close_session), methods=["POST"]),
        Route("/execute", swx(r.swx_execute), methods=["POST"]),
        Route("/read_file", swx(r.swx_read_file), methods=["POST"]),
        Route("/write_file", swx(r.swx_write_file), methods=["POST"]),
        Route("/upload", swx(r.swx_upload), methods=["POST"]),
        Route("/close", swx(r.swx_close), methods=["POST"]),
        Route(f"{p}/sessions", rock(r.rock_create_session), methods=["POST"]),
        Route(f"{p}/sessions/run", rock(r.rock_run), methods=["POST"]),
        Route(f"{p}/sessions/stream", rock(r.rock_run_stream), methods=["POST"]),
        Route(f"{p}/sessions/stdin", rock(r.rock_stdin), methods=["POST"]),
        Route(f"{p}/sessions/interrupt", rock(r.rock_interrupt), methods=["POST"]),
        Route(f"{p}/sessions/close", rock(r.rock_close_session), methods=["POST"]),
        Route(f"{p}/exec", rock(r.rock_exec), methods=["POST"]),
        Route(f"{p}/exec/stream", rock(r.rock_exec_stream), methods=["POST"]),
        Route(f"{p}/files", rock(r.rock_read), methods=["GET"]),
        Route(f"{p}/files", rock(r.rock_write), methods=["PUT"]),
        Route(f"{p}/files/stat", rock(r.rock_stat), methods=["GET"]),
        Route(f"{p}/files/list", rock(r.rock_list), methods=["GET"]),
        Route(f"{p}/files/mkdir", rock(r.rock_mkdir), methods=["POST"]),
        Route(f"{p}/files/remove", rock(r.rock_remove), methods=["POST"]),
        Route(f"{p}/tar", rock(r.rock_tar_download), methods=["GET"]),
        Route(f"{p}/tar", rock(r.rock_tar_upload), methods=["PUT"]),
        Route(f"{p}/stats", rock(r.rock_stats), methods=["GET"]),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if r._factory is not None:
            await r.handle()
        try:
            yield
        finally:
            await r.shutdown()

    middleware = [Middleware(_AuthMiddleware, token=token)] if token else []
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception},
    )
    app.state.rocklet = r
    return app
