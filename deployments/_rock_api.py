"""ROCK's sandbox API (``/apis/envs/sandbox/v1/*``) on the Admin, so rl-rock's SDK works as is.

``Sandbox(SandboxConfig(base_url=<platform>)).start()`` and every call after it reach these
routes (rl-rock 1.11.0, ``rock/sdk/sandbox/client.py``; server side
``rock/admin/entrypoints/sandbox_api.py``). Each route maps onto the platform's own operations
through the same SDK client as ``/run_code`` (``_compat.platform_client``, the Ray
transport: Scheduler create/get/delete and the owning Worker's exec, sessions and files),
so there is one implementation of each operation and this module only translates.

Dialect: every reply is ROCK's ``RockResponse`` envelope with HTTP 200, failures included
(``status: "Failed"``, ``result: {"code": 4000|5000|6000, "failure_reason"}``), exactly as
ROCK's ``handle_exceptions`` answers; invalid bodies too (ROCK's validation handler). Only a
refused credential is HTTP 401 (with the envelope body), so proxies and clients see it.
:class:`RockRoute` does that for every route here, including its dependencies' errors.

Mapping: ``auto_clear_time_minutes`` is the sandbox's lease (each call renews it), ``memory``
/ ``cpus`` (or ``limit_cpus``) / ``disk`` are its resources, ROCK's ``sandbox_id`` is the
create's idempotency key, ``stop`` and ``delete`` remove it, ``X-User-Id`` is its owner and
``X-User-Id``/``X-Experiment-Id`` are labels. Images go through ``compat.rock_images``.
``/get_token`` answers without an OSS config, so the SDK uploads through ``/upload``.
``run_in_session`` with ``check="raise"`` (the SDK's default) and a non-zero exit is a
``Failed`` reply, as in ROCK: ``arun(mode="nohup")`` relies on it (``kill -0`` polling).

Wiring (``admin.py``): ``app.include_router(_rock_api.router)`` before ``@serve.ingress``.
"""

# No "from __future__ import annotations": FastAPI reads these annotations at include time.

import codecs
import contextlib
import datetime
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from rock_serve.auth import Principal
from rock_serve.deployments._auth import Auth, NamespaceGuard, check_spec_privileges
from rock_serve.deployments._compat import platform_client
from rock_serve.errors import (
    InvalidRequest,
    RockError,
    SandboxNotFound,
    Unauthorized,
)
from rock_serve.protocol import (
    DEFAULT_TIMEOUT,
    CreateSandboxRequest,
    Resources,
    SandboxRecord,
    SandboxState,
    validate_image_ref,
)
from rock_serve.protocol.rock import (
    RockBashAction,
    RockCloseSessionRequest,
    RockCode,
    RockCommand,
    RockCreateSessionRequest,
    RockReadFileRequest,
    RockResponse,
    RockSandboxIdBody,
    RockStartRequest,
    RockWriteFileRequest,
)
from rock_serve.rocklet._swerex import EXEC_OUTPUT_CAP, SESSION_OUTPUT_CAP, _clean_output
from rock_serve.sdk import AsyncClient

__all__ = ["ROCK_PREFIX", "RockRoute", "check_sandbox", "parse_size_mb", "router"]

log = logging.getLogger(__name__)

ROCK_PREFIX = "/apis/envs/sandbox/v1"
#: Labels put on sandboxes made through this API.
API_LABEL = "rock-serve/api"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_UNIT_MB = {"": 1 / (1 << 20), "k": 1 / 1024, "m": 1, "g": 1024, "t": 1 << 20, "p": 1 << 30}
#: What each route says when it fails (ROCK's ``handle_exceptions(error_message=...)``).
_MESSAGES = {
    "rock_start_async": "async start sandbox failed",
    "rock_is_alive": "get sandbox is alive failed",
    "rock_get_status": "get sandbox status failed",
    "rock_execute": "execute command failed",
    "rock_create_session": "create session failed",
    "rock_run_in_session": "run in session failed",
    "rock_close_session": "close session failed",
    "rock_read_file": "read file failed",
    "rock_write_file": "write file failed",
    "rock_upload": "upload file failed",
    "rock_stop": "stop sandbox failed",
    "rock_delete": "delete sandbox failed",
    "rock_get_token": "get token failed",
}


def _failed(message: str | None, error: str, code: RockCode, status: int = 200) -> JSONResponse:
    body = RockResponse(
        status="Failed",
        message=message,
        error=error,
        result={"code": int(code), "exit_code": None, "failure_reason": error},
    )
    headers = {"WWW-Authenticate": 'Bearer realm="rock-serve"'} if status == 401 else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _code_of(exc: RockError) -> RockCode:
    return RockCode.BAD_REQUEST if exc.status < 500 else RockCode.INTERNAL_SERVER_ERROR


class RockRoute(APIRoute):
    """A route that answers every failure in ROCK's envelope (never our error body)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        message = _MESSAGES.get(self.name, f"{self.name} failed")

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}"
                    for err in exc.errors()
                )
                return _failed("invalid parameter", problems[:2000], RockCode.BAD_REQUEST)
            except Unauthorized as exc:
                return _failed(message, exc.message, RockCode.BAD_REQUEST, status=401)
            except RockError as exc:
                return _failed(message, f"{exc.code.value}: {exc.message}", _code_of(exc))
            except StarletteHTTPException as exc:  # e.g. a malformed multipart body
                server = exc.status_code >= 500
                code = RockCode.INTERNAL_SERVER_ERROR if server else RockCode.BAD_REQUEST
                return _failed(message, str(exc.detail), code)
            except Exception:
                log.exception("unexpected error on %s %s", request.method, request.url.path)
                return _failed(message, "internal error", RockCode.INTERNAL_SERVER_ERROR)

        return route


router = APIRouter(prefix=ROCK_PREFIX, tags=["rock"], route_class=RockRoute)

Client = Annotated[AsyncClient, Depends(platform_client)]
SandboxIdQuery = Annotated[str, Query(min_length=1, max_length=128, description="The sandbox.")]

#: Per-replica namespace cache of sandboxes (see NamespaceGuard), made with the first client.
_GUARD: list[NamespaceGuard] = []


def _ok(result: Any) -> RockResponse:
    return RockResponse(status="Success", result=result)


def _admin() -> Any:
    from ray import serve  # lazily: only the replica has a replica context

    return serve.get_replica_context().servable_object


async def check_sandbox(client: AsyncClient, principal: Principal, sandbox_id: str) -> None:
    """Raise SandboxNotFound unless ``principal`` may act on ``sandbox_id``."""
    if not _GUARD:
        _GUARD.append(NamespaceGuard(client.get_sandbox))
    await _GUARD[0].check(principal, sandbox_id)


def _audited(
    request: Request,
    principal: Principal,
    action: str,
    sandbox_id: str | None = None,
    **fields: Any,
) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
    """The Admin's audit block (the same events as REST v1, under ``rock.*`` actions)."""
    audited: Callable[..., contextlib.AbstractAsyncContextManager[dict[str, Any]]]
    audited = _admin()._audited
    return audited(request, principal, action, sandbox_id, **fields)


def parse_size_mb(value: str | None) -> int | None:
    """``"8g"``, ``"512m"``, ``"50G"``, ``"1.5Gi"`` -> MiB (rounded up); None/empty -> None.

    A bare number is bytes, as for Docker's ``--memory``.

    Raises:
        InvalidRequest: not a size.
    """
    if value is None or not value.strip():
        return None
    match = _SIZE.match(value)
    if match is None:
        raise InvalidRequest(f"{value!r} is not a size such as '8g' or '512m'")
    number, unit = float(match.group(1)), match.group(2).lower()
    return max(1, math.ceil(number * _UNIT_MB[unit]))


def _image(name: str) -> str | None:
    compat = _admin().args.compat
    if name in compat.rock_images:
        mapped: str | None = compat.rock_images[name]
        return mapped
    policy = compat.rock_unmapped_images
    if policy == "auto":
        policy = "pass" if _admin().args.runtime.type == "docker" else "default"
    if policy != "pass":
        return None
    validate_image_ref(name)  # malformed: invalid_image_reference, in ROCK's envelope
    return name


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat()


def _phase(status: str, message: str) -> dict[str, str]:
    return {"status": status, "message": message}


def _status(record: SandboxRecord) -> dict[str, Any]:
    """ROCK's ``SandboxStatusResponse`` of one of our records."""
    state = record.state
    alive = state == SandboxState.RUNNING
    if state in (SandboxState.PENDING, SandboxState.STARTING):
        phases = {"image_pull": _phase("running", "preparing"), "docker_run": _phase("waiting", "")}
        rock_state = "pending"
    elif state == SandboxState.FAILED:
        why = record.reason.value if record.reason is not None else "failed"
        phases = {"image_pull": _phase("success", ""), "docker_run": _phase("failed", why)}
        rock_state = "stopped"
    elif alive:
        phases = {
            "image_pull": _phase("success", "image ready"),
            "docker_run": _phase("success", "sandbox running"),
        }
        rock_state = "running"
    else:
        phases = {"docker_run": _phase("success", state.value)}
        rock_state = "deleted" if state == SandboxState.REMOVED else "stopped"
    memory = record.resources.memory_mb
    disk = record.resources.disk_mb
    return {
        "sandbox_id": record.id,
        "status": phases,
        "state": rock_state,
        "is_alive": alive,
        "host_name": record.worker,
        "host_ip": None,
        "image": record.image,
        "user_id": record.labels.get("rock/user_id"),
        "experiment_id": record.labels.get("rock/experiment_id"),
        "namespace": record.namespace,
        "cpus": record.resources.cpus,
        "memory": f"{memory}m" if memory else None,
        "disk": f"{disk}m" if disk else None,
        "port_mapping": {},
        "create_time": _iso(record.created_at),
        "auto_stop_time": _iso(record.lease_expires_at or record.expires_at),
    }


# ------------------------------------------------------------------------------ lifecycle


@router.post("/start_async", response_model=RockResponse, name="rock_start_async")
async def start_async(
    req: RockStartRequest, request: Request, principal: Auth, client: Client
) -> RockResponse:
    """Create a sandbox (ROCK's ``start_async``); poll ``get_status`` until ``is_alive``."""
    args = _admin().args
    minutes = req.auto_clear_time_minutes or req.auto_clear_time
    lease = min(minutes * 60.0, args.max_lease_seconds) if minutes else None
    resources = Resources(
        cpus=req.limit_cpus or req.cpus,
        memory_mb=parse_size_mb(req.memory),
        disk_mb=parse_size_mb(req.disk),
    )
    if args.compat.rock_resources == "ignore":  # the default spec: warm pools apply
        resources = Resources()
    user = request.headers.get("x-user-id")
    experiment = request.headers.get("x-experiment-id")
    labels = {API_LABEL: "rock"}
    if user:
        labels["rock/user_id"] = user[:256]
    if experiment:
        labels["rock/experiment_id"] = experiment[:256]
    create = CreateSandboxRequest(
        image=_image(req.image),
        resources=resources,
        lease_seconds=lease,
        owner=(user or "")[:256],
        labels=labels,
        client_token=req.sandbox_id,
    )
    async with _audited(
        request, principal, "rock.start", detail={"image": req.image, "owner": create.owner}
    ) as event:
        check_spec_privileges(principal, create)
        record = await client.create_sandbox(create)
        event["sandbox_id"] = record.id
    if _GUARD:
        _GUARD[0].remember(record.id, record.namespace)
    return _ok(
        {
            "code": int(RockCode.OK),
            "sandbox_id": record.id,
            "host_name": record.worker,
            "host_ip": None,
            "cpus": record.resources.cpus,
            "memory": req.memory,
            "disk": req.disk,
        }
    )


@router.get("/get_status", response_model=RockResponse, name="rock_get_status")
async def get_status(
    sandbox_id: SandboxIdQuery, principal: Auth, client: Client, include_all_states: bool = False
) -> RockResponse:
    """ROCK's ``SandboxStatusResponse``: ``is_alive`` once running, phases in ``status``."""
    await check_sandbox(client, principal, sandbox_id)
    return _ok(_status(await client.get_sandbox(sandbox_id)))


@router.get("/is_alive", response_model=RockResponse, name="rock_is_alive")
async def is_alive(sandbox_id: SandboxIdQuery, principal: Auth, client: Client) -> RockResponse:
    """``{"is_alive", "message"}``; false (not a failure) for an unknown sandbox, as in ROCK."""
    try:
        await check_sandbox(client, principal, sandbox_id)
        record = await client.get_sandbox(sandbox_id)
    except SandboxNotFound:
        return _ok({"is_alive": False, "message": f"sandbox {sandbox_id} is alive failed"})
    return _ok({"is_alive": record.state == SandboxState.RUNNING, "message": record.worker})


@router.post("/stop", response_model=RockResponse, name="rock_stop")
async def stop(
    body: RockSandboxIdBody, request: Request, principal: Auth, client: Client
) -> RockResponse:
    """Remove the sandbox (a stopped sandbox has nothing worth keeping here)."""
    async with _audited(request, principal, "rock.stop", body.sandbox_id):
        await check_sandbox(client, principal, body.sandbox_id)
        await client.delete_sandbox(body.sandbox_id)
    return _ok(f"{body.sandbox_id} stopped")


@router.post("/delete", response_model=RockResponse, name="rock_delete")
async def delete(
    body: RockSandboxIdBody, request: Request, principal: Auth, client: Client
) -> RockResponse:
    """Remove the sandbox; an unknown one is a success (idempotent, as in ROCK)."""
    async with _audited(request, principal, "rock.delete", body.sandbox_id):
        try:
            await check_sandbox(client, principal, body.sandbox_id)
            await client.delete_sandbox(body.sandbox_id)
        except SandboxNotFound:
            pass
    return _ok(f"{body.sandbox_id} deleted")


@router.get("/get_token", response_model=RockResponse, name="rock_get_token")
async def get_token(principal: Auth) -> RockResponse:
    """No OSS here: an answer without an OSS config makes the SDK upload via ``/upload``."""
    return _ok({"Expiration": "2099-12-31T23:59:59Z"})


# ------------------------------------------------------------------------------ commands


def _argv(cmd: RockCommand) -> list[str]:
    if isinstance(cmd.command, str):
        # A string runs through the shell (ROCK passes it to subprocess, where shell=False
        # would only find a program of that exact name).
        argv = ["/bin/sh", "-c", cmd.command]
    elif not cmd.command:
        raise InvalidRequest("command must not be empty")
    else:
        argv = ["/bin/sh", "-c", *cmd.command] if cmd.shell else list(cmd.command)
    if cmd.env is not None:  # subprocess semantics: env replaces the environment
        argv = ["env", "-i", *(f"{k}={v}" for k, v in cmd.env.items()), *argv]
    return argv


@router.post("/execute", response_model=RockResponse, name="rock_execute")
async def execute(
    cmd: RockCommand, request: Request, principal: Auth, client: Client
) -> RockResponse | JSONResponse:
    """One command in a fresh process: ``{"stdout", "stderr", "exit_code"}``."""
    async with _audited(
        request, principal, "rock.execute", cmd.sandbox_id, command=cmd.command
    ) as event:
        await check_sandbox(client, principal, cmd.sandbox_id)
        result = await client.exec(
            cmd.sandbox_id,
            _argv(cmd),
            shell=False,
            cwd=cmd.cwd,
            timeout=cmd.timeout or DEFAULT_TIMEOUT,
            max_output_bytes=EXEC_OUTPUT_CAP,
        )
        event["detail"]["exit_code"] = result.exit_code
    stdout = result.stdout_bytes().decode("utf-8", "backslashreplace")
    stderr = result.stderr_bytes().decode("utf-8", "backslashreplace")
    if result.timed_out:
        error = f"Timeout ({cmd.timeout}s) exceeded while running command"
        return _failed(_MESSAGES["rock_execute"], error, RockCode.COMMAND_ERROR)
    if cmd.check and result.exit_code != 0:
        error = (
            f"Command {cmd.command!r} failed with exit code {result.exit_code}. "
            f"Stdout:\n{stdout!r}\nStderr:\n{stderr!r}"
        )
        error = f"{cmd.error_msg}: {error}" if cmd.error_msg else error
        return _failed(_MESSAGES["rock_execute"], error, RockCode.COMMAND_ERROR)
    return _ok({"stdout": stdout, "stderr": stderr, "exit_code": result.exit_code})


@router.post("/create_session", response_model=RockResponse, name="rock_create_session")
async def create_session(
    req: RockCreateSessionRequest, request: Request, principal: Auth, client: Client
) -> RockResponse:
    """A persistent bash session: ``{"output", "session_type"}``."""
    if req.remote_user is not None:
        raise InvalidRequest("remote_user is not supported: sessions run as the sandbox's user")
    async with _audited(
        request, principal, "rock.session.create", req.sandbox_id, session=req.session
    ):
        await check_sandbox(client, principal, req.sandbox_id)
        resp = await client.create_session(
            req.sandbox_id,
            req.session,
            env=req.env if (req.env_enable or req.env) else None,
            startup_commands=[f"source {path}" for path in req.startup_source],
        )
    return _ok({"output": resp.output, "session_type": "bash"})


@router.post("/run_in_session", response_model=RockResponse, name="rock_run_in_session")
async def run_in_session(
    action: RockBashAction, request: Request, principal: Auth, client: Client
) -> RockResponse | JSONResponse:
    """A command in a session: ROCK's ``BashObservation``. ``check="raise"`` and a non-zero
    exit give a ``Failed`` reply (code 6000), as ROCK does.
    """
    if action.is_interactive_command or action.is_interactive_quit:
        raise InvalidRequest("interactive commands are not supported on this route")
    timeout = action.timeout if action.timeout is not None else DEFAULT_TIMEOUT
    async with _audited(
        request,
        principal,
        "rock.session.run",
        action.sandbox_id,
        session=action.session,
        command=action.command,
    ) as event:
        await check_sandbox(client, principal, action.sandbox_id)
        res = await client.run(
            action.sandbox_id,
            action.command,
            session=action.session,
            timeout=timeout,
            max_output_bytes=SESSION_OUTPUT_CAP,
        )
        event["detail"]["exit_code"] = res.exit_code
    output = _clean_output(res.output_bytes())
    message = _MESSAGES["rock_run_in_session"]
    if res.timed_out:
        error = f"timeout after {timeout} seconds while running command {action.command!r}"
        return _failed(message, error, RockCode.COMMAND_ERROR)
    if action.check == "raise" and res.exit_code != 0:
        error = (
            f"Command {action.command!r} failed with exit code {res.exit_code}. "
            f"Here is the output:\n{output!r}"
        )
        error = f"{action.error_msg}: {error}" if action.error_msg else error
        return _failed(message, error, RockCode.COMMAND_ERROR)
    return _ok(
        {
            "session_type": "bash",
            "output": output,
            "exit_code": None if action.check == "ignore" else res.exit_code,
            "failure_reason": "",
            "expect_string": "",
        }
    )


@router.post("/close_session", response_model=RockResponse, name="rock_close_session")
async def close_session(
    req: RockCloseSessionRequest, request: Request, principal: Auth, client: Client
) -> RockResponse:
    """Close a session: ``{"session_type": "bash"}``."""
    async with _audited(
        request, principal, "rock.session.close", req.sandbox_id, session=req.session
    ):
        await check_sandbox(client, principal, req.sandbox_id)
        await client.close_session(req.sandbox_id, session=req.session)
    return _ok({"session_type": "bash"})


# ------------------------------------------------------------------------------ files


@router.post("/read_file", response_model=RockResponse, name="rock_read_file")
async def read_file(req: RockReadFileRequest, principal: Auth, client: Client) -> RockResponse:
    """A text file's content: ``{"content"}`` (universal newlines, as ``Path.read_text``)."""
    encoding, errors = req.encoding or "utf-8", req.errors or "strict"
    try:
        codecs.lookup(encoding)
        codecs.lookup_error(errors)
    except LookupError as exc:
        raise InvalidRequest(str(exc)) from None
    await check_sandbox(client, principal, req.sandbox_id)
    data = await client.read_file(req.sandbox_id, req.path)
    try:
        text = codecs.decode(data, encoding, errors)
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{req.path} is not {encoding} text: {exc.reason}") from None
    return _ok({"content": text.replace("\r\n", "\n").replace("\r", "\n")})


@router.post("/write_file", response_model=RockResponse, name="rock_write_file")
async def write_file(
    req: RockWriteFileRequest, request: Request, principal: Auth, client: Client
) -> RockResponse:
    """Write a text file (parents made): ``{"success", "message"}``."""
    data = req.content.encode("utf-8")
    async with _audited(
        request, principal, "rock.file.write", req.sandbox_id, path=req.path
    ) as event:
        _check_size(len(data))
        await check_sandbox(client, principal, req.sandbox_id)
        await client.write_file(req.sandbox_id, req.path, data)
        event["detail"]["bytes"] = len(data)
    return _ok({"success": True, "message": f"Successfully write content to file {req.path}"})


def _check_size(size: int) -> None:
    limit: int = _admin().args.max_file_bytes
    if size > limit:
        raise InvalidRequest(f"body of {size} bytes is over the {limit}-byte limit")


async def _read_upload(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(1 << 20):
        yield chunk


@router.post("/upload", response_model=RockResponse, name="rock_upload")
async def upload(request: Request, principal: Auth, client: Client) -> RockResponse:
    """Multipart ``file``, ``target_path``, ``sandbox_id``: ``{"success", "message",
    "file_name"}``. Bodies over ``max_file_bytes`` and malformed forms are ``Failed`` (4000).
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        _check_size(int(declared) - 64 * 1024)  # the form's own fields are small
    async with request.form(max_files=1, max_fields=8) as form:
        file = form.get("file")
        target = form.get("target_path")
        sandbox_id = form.get("sandbox_id")
        if not isinstance(file, UploadFile):
            raise InvalidRequest("multipart field 'file' is missing or not a file")
        if not isinstance(target, str) or not target:
            raise InvalidRequest("multipart field 'target_path' is missing")
        if not isinstance(sandbox_id, str) or not sandbox_id:
            raise InvalidRequest("multipart field 'sandbox_id' is missing")
        size = file.size if file.size is not None else 0
        _check_size(size)
        async with _audited(
            request, principal, "rock.file.upload", sandbox_id, path=target
        ) as event:
            await check_sandbox(client, principal, sandbox_id)
            data = b"".join([chunk async for chunk in _read_upload(file)])
            _check_size(len(data))
            await client.write_file(sandbox_id, target, data)
            event["detail"]["bytes"] = len(data)
        name = file.filename or ""
    return _ok(
        {
            "success": True,
            "message": f"Successfully uploaded file {name} to {target}",
            "file_name": name,
        }
    )
