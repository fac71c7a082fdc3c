"""The sans-IO core shared by :class:`AsyncClient` and :class:`Client`.

Everything here is pure: it builds the requests of the REST v1 routes (see
:mod:`rock_serve.protocol.api`), parses replies into protocol models, maps error replies to the
typed exceptions of :mod:`rock_serve.errors`, and decides whether and how long to wait before a
retry. The two clients only send, sleep and read; they differ in ``await`` alone.
"""

from __future__ import annotations

import email.utils
import functools
import json
import math
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast
from urllib.parse import quote

import anyio
import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rock_serve import __version__
from rock_serve.auth import CREDENTIALS_ENV, credentials_path, read_credentials
from rock_serve.errors import (
    InternalError,
    InvalidRequest,
    RockError,
    RockletUnavailable,
    RuntimeUnavailable,
    from_body,
    from_validation,
)
from rock_serve.protocol import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    CreateSandboxRequest,
    ExecRequest,
    ExecResult,
    ImagePullRequest,
    ImagePushRequest,
    OutputChunk,
    RegistryAuth,
    SandboxState,
    SessionRunResult,
)
from rock_serve.protocol.ops import OPS, Op

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_HTTP_TIMEOUT",
    "ClientSettings",
    "RetryPolicy",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
#: Seconds for connect/read/write of control-plane calls (``ROCK_TIMEOUT`` overrides it).
DEFAULT_HTTP_TIMEOUT = 60.0
#: Extra read time granted to a command on top of its own timeout.
COMMAND_TIMEOUT_MARGIN = 30.0
API_PREFIX = "/v1"

Method = Literal["GET", "POST", "PUT", "DELETE"]
M = TypeVar("M", bound=BaseModel)
R_ = TypeVar("R_")
I_ = TypeVar("I_")


class ClientSettings(BaseModel):
    """Where and how an SDK client connects; read from ``ROCK_*`` environment variables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(
        default=DEFAULT_BASE_URL, description="Root URL of the platform (``ROCK_BASE_URL``)."
    )
    token: str | None = Field(
        default=None, description="Bearer token sent as ``Authorization`` (``ROCK_TOKEN``)."
    )
    timeout: float = Field(
        default=DEFAULT_HTTP_TIMEOUT,
        gt=0,
        description="Seconds for connect/read/write of one HTTP call (``ROCK_TIMEOUT``).",
    )

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float | None = None,
    ) -> ClientSettings:
        """Settings from explicit arguments, falling back to ``ROCK_*`` variables, then defaults.

        Without a token argument or ``ROCK_TOKEN``, the token saved for this base URL in the
        credentials file (``ROCK_CREDENTIALS``, else ``~/.rock/credentials``, as ``rock up``
        writes it) is used. With an explicit ``environ``, only its ``ROCK_CREDENTIALS`` is read.

        Args:
            environ: The environment to read (default: ``os.environ``).
            base_url: Overrides ``ROCK_BASE_URL``.
            token: Overrides ``ROCK_TOKEN`` (``""`` means no token).
            timeout: Overrides ``ROCK_TIMEOUT``.

        Returns:
            The validated settings.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if (url := base_url or env.get("ROCK_BASE_URL")) is not None and url != "":
            values["base_url"] = url
        if (tok := token if token is not None else env.get("ROCK_TOKEN")) is not None:
            values["token"] = tok or None
        elif environ is None or CREDENTIALS_ENV in env:
            saved = read_credentials(
                credentials_path(env), values.get("base_url", DEFAULT_BASE_URL)
            )
            values["token"] = saved
        if timeout is not None:
            values["timeout"] = timeout
        elif env.get("ROCK_TIMEOUT"):
            values["timeout"] = env["ROCK_TIMEOUT"]
        return cls(**values)


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before retrying a call.

    Retried: 429 and 503 replies (any method; not ``rocklet_unavailable``, whose sandbox is
    gone for good); and failures on the way, before our server answered: connection errors,
    and 500/502/503/504 replies that do not carry our error body (a Serve proxy whose Admin
    replica died). Those are resent only when a resend is safe: GET/PUT/DELETE, creates (the
    SDK gives each one a ``client_token``) and commands (each carries an ``Idempotency-Key``:
    the Worker runs a command once per key and answers a resend with the first result).
    The wait is the server's ``Retry-After`` (header, else the error body's ``retry_after``)
    when it gives one, otherwise exponential backoff with jitter: attempt ``n``
    (1-based) waits a uniform time in ``[d/2, d]`` with ``d = min(max_backoff, base * 2**(n-1))``.
    A call gives up after ``max_attempts`` sends, or when the next wait would end after
    ``max_total`` seconds from the first send; the last error is raised as is (for instance
    :class:`~rock_serve.errors.RateLimited` with its ``retry_after``).
    """

    max_attempts: int = 5
    base: float = 0.5
    max_backoff: float = 8.0
    max_total: float = 60.0
    retry_statuses: frozenset[int] = frozenset({429, 503})
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``attempt``-th failed send (1-based)."""
        if retry_after is not None and retry_after >= 0:
            return float(retry_after)
        ceiling = min(self.max_backoff, self.base * 2.0 ** (attempt - 1))
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)


#: Transport failures after which a GET is resent (the request may not have arrived, and a GET
#: changes nothing if it did). Read timeouts are not among them: the server is slow, not gone.
RETRYABLE_TRANSPORT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)


class RetryState:
    """The retry bookkeeping of one logical call (one per call, not per client)."""

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._clock = clock
        self._start: float = clock()
        self._attempt = 0

    def _next(self, retry_after: float | None) -> float | None:
        self._attempt += 1
        if self._attempt >= self._policy.max_attempts:
            return None
        delay = self._policy.backoff(self._attempt, retry_after)
        if self._clock() - self._start + delay > self._policy.max_total:
            return None
        return delay

    def after_error(self, status: int, error: RockError, call: Call | None = None) -> float | None:
        """Seconds to wait before resending after an error reply, or None to raise it."""
        if isinstance(error, RockletUnavailable):
            # A dead rocklet stays dead: its sandbox must be recreated, not the call resent.
            return None
        if status in self._policy.retry_statuses:
            return self._next(error.retry_after)
        if status in UPSTREAM_STATUSES and error.details.get("upstream") and safe_to_resend(call):
            return self._next(error.retry_after)
        return None

    def after_transport_error(self, call: Call, exc: httpx.TransportError) -> float | None:
        """Seconds to wait before resending after a transport failure, or None to raise it."""
        if not safe_to_resend(call) or not isinstance(exc, RETRYABLE_TRANSPORT_ERRORS):
            return None
        return self._next(None)


#: Statuses a proxy answers when the server behind it failed mid-request.
UPSTREAM_STATUSES = frozenset({500, 502, 503, 504})


def safe_to_resend(call: Call | None) -> bool:
    """Whether resending ``call`` cannot do its work twice."""
    if call is None:
        return False
    return call.method in ("GET", "PUT", "DELETE") or call.idempotency_key is not None


async def asleep(seconds: float) -> None:
    """Wait without blocking the event loop (the async twin of :func:`sleep`)."""
    await anyio.sleep(seconds)


def sleep(seconds: float) -> None:
    """Block the calling thread (the sync twin of :func:`asleep`)."""
    time.sleep(seconds)


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class Call:
    """One REST v1 request, independent of any HTTP library's client object."""

    method: Method
    path: str
    params: tuple[tuple[str, str], ...] = ()
    json: Any = None
    content: bytes | None = None
    #: Read timeout for this call; ``"default"`` uses the client's, None waits forever.
    read_timeout: float | None | Literal["default"] = "default"
    #: Sent as ``Idempotency-Key``: the server does the work once per key (resends are safe).
    idempotency_key: str | None = None
    #: W3C trace id of this call (its retries share it): sent in ``traceparent``, echoed by
    #: the Admin as ``X-Trace-Id`` and written in its logs.
    trace_id: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)
    #: The sandbox whose data-plane operation this is: such a call may go straight to the
    #: sandbox's node (the direct data plane, same path and body); None: through the Admin.
    sandbox: str | None = None
    #: The operation model (:mod:`rock_serve.protocol.ops`) of a data-plane call made by
    #: :func:`op_call`: an HTTP transport builds its query and body from it
    #: (:func:`request_kwargs`), the Ray transport sends the model itself.
    op: Op[Any] | None = field(default=None, compare=False)


def new_key() -> str:
    """A fresh idempotency key (or client token)."""
    return uuid.uuid4().hex


def _seg(value: str) -> str:
    """Quote one path segment so an id or name can never change the route."""
    return quote(value, safe="")


def _sandbox(sandbox_id: str, *rest: str) -> str:
    return "/".join([f"{API_PREFIX}/sandboxes/{_seg(sandbox_id)}", *rest])


def command_read_timeout(timeout: float | None) -> float | None:
    """A command may take its own timeout; the HTTP read waits that long plus a margin."""
    return None if timeout is None else timeout + COMMAND_TIMEOUT_MARGIN


def _dump(model: BaseModel) -> Any:
    return model.model_dump(mode="json", exclude_unset=True)


def health() -> Call:
    """``GET /v1/health``."""
    return Call("GET", f"{API_PREFIX}/health")


def create_sandbox(request: CreateSandboxRequest) -> Call:
    """``POST /v1/sandboxes``; a request without ``client_token`` gets a fresh one, so that a
    resend after a lost answer returns the same sandbox instead of making a second.
    """
    if request.client_token is None:
        request = request.model_copy(update={"client_token": new_key()})
    return Call(
        "POST",
        f"{API_PREFIX}/sandboxes",
        json={**_dump(request), **_auth_body(request.registry_auth)},
        idempotency_key=request.client_token,
    )


def _auth_body(auth: RegistryAuth | None) -> dict[str, Any]:
    """Registry credentials as sent (the model never dumps them, so records never hold them)."""
    if auth is None:
        return {}
    body: dict[str, Any] = {"username": auth.username}
    if auth.password is not None:
        body["password"] = auth.password.get_secret_value()
    if auth.token is not None:
        body["token"] = auth.token.get_secret_value()
    return {"registry_auth": body}


def pull_images(request: ImagePullRequest) -> Call:
    """``POST /v1/images/pull`` (NDJSON progress; no read timeout: pulls may be long)."""
    body = {**_dump(request.model_copy(update={"auth": None})), **_auth_body(request.auth)}
    body["auth"] = body.pop("registry_auth", None)
    return Call("POST", f"{API_PREFIX}/images/pull", json=body, read_timeout=None)


def push_image(request: ImagePushRequest) -> Call:
    """``POST /v1/images/push`` (no read timeout: a push writes every layer out)."""
    body = {**_dump(request.model_copy(update={"auth": None})), **_auth_body(request.auth)}
    body["auth"] = body.pop("registry_auth", None)
    return Call("POST", f"{API_PREFIX}/images/push", json=body, read_timeout=None)


def commit_sandbox(sandbox_id: str, image: str) -> Call:
    """``POST /v1/sandboxes/{id}/commit`` (no read timeout: a big upper dir takes a while)."""
    return Call("POST", _sandbox(sandbox_id, "commit"), json={"image": image}, read_timeout=None)


def list_images() -> Call:
    """``GET /v1/images``."""
    return Call("GET", f"{API_PREFIX}/images")


def remove_image(ref: str) -> Call:
    """``DELETE /v1/images/{ref}``."""
    return Call("DELETE", f"{API_PREFIX}/images/{quote(ref, safe='/:@')}")


def get_sandbox(sandbox_id: str) -> Call:
    """``GET /v1/sandboxes/{id}``."""
    return Call("GET", _sandbox(sandbox_id))


def list_sandboxes(
    owner: str | None = None,
    state: SandboxState | str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Call:
    """``GET /v1/sandboxes?owner=&state=&label=k=v``."""
    params: list[tuple[str, str]] = []
    if owner is not None:
        params.append(("owner", owner))
    if state is not None:
        params.append(("state", SandboxState(state).value))
    for key, value in (labels or {}).items():
        params.append(("label", f"{key}={value}"))
    return Call("GET", f"{API_PREFIX}/sandboxes", params=tuple(params))


def delete_sandbox(sandbox_id: str) -> Call:
    """``DELETE /v1/sandboxes/{id}``."""
    return Call("DELETE", _sandbox(sandbox_id))


def delete_by_token(client_token: str) -> Call:
    """``DELETE /v1/sandboxes?client_token=``."""
    return Call("DELETE", f"{API_PREFIX}/sandboxes", params=(("client_token", client_token),))


def renew(sandbox_id: str) -> Call:
    """``POST /v1/sandboxes/{id}/renew``."""
    return Call("POST", f"{_sandbox(sandbox_id)}/renew", sandbox=sandbox_id)


def op_call(sandbox_id: str, op: Op[Any], *, stream: bool = False) -> Call:
    """The REST call of operation ``op`` on ``sandbox_id``, generically from its ``OPS`` row.

    The route's method and path template come from the row (``{sandbox_id}`` and any other
    ``{field}`` filled from the model, each quoted as one segment); the model's key goes as
    ``Idempotency-Key``; an operation with a ``timeout`` gets that plus a margin as its read
    timeout. The query and body are built from the model when the call is sent over HTTP
    (:func:`op_rest`), so a transport that takes models (Ray) never encodes them.
    """
    spec = OPS[op.op]  # type: ignore[attr-defined]
    method, template = spec.route
    segments = {name: _seg(getattr(op, name)) for name in _path_fields(template)}
    read: float | None | Literal["default"] = "default"
    if "timeout" in type(op).model_fields:
        read = command_read_timeout(getattr(op, "timeout"))  # noqa: B009 - not every op has it
    return Call(
        cast(Method, method),
        template.format(sandbox_id=_seg(sandbox_id), **segments),
        params=(("stream", "true"),) if stream else (),
        read_timeout=read,
        idempotency_key=None if stream else getattr(op, "idempotency_key", None),
        sandbox=sandbox_id,
        op=op,
    )


_FIELD = re.compile(r"\{(\w+)\}")
#: Fields of an operation that never go on the wire as such (the tag is the route; the key is
#: the ``Idempotency-Key`` header).
_NOT_SENT = frozenset({"op", "idempotency_key"})
#: How a query parameter is written when ``str`` is not it (``mode``: octal, as routes read it).
QUERY_FORMAT: dict[str, Callable[[Any], str]] = {"mode": lambda value: format(value, "o")}


def _query_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@functools.cache
def _path_fields(template: str) -> tuple[str, ...]:
    return tuple(name for name in _FIELD.findall(template) if name != "sandbox_id")


@functools.cache
def op_wire(tag: str) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    """Where each field of operation ``tag`` goes over HTTP: (path fields, query-or-JSON
    fields, raw-body field). The rule, from the ``OPS`` row alone: fields named in the path
    template fill it; a ``bytes`` field is the raw body; the rest is the query of a
    GET/PUT/DELETE route and the JSON body of a POST one.
    """
    spec = OPS[tag]
    path = _path_fields(spec.route[1])
    raw = [n for n, f in spec.model.model_fields.items() if f.annotation is bytes]
    rest = tuple(
        n for n in spec.model.model_fields if n not in _NOT_SENT and n not in path and n not in raw
    )
    return path, rest, raw[0] if raw else None


def op_rest(call: Call) -> tuple[tuple[tuple[str, str], ...], Any, bytes | None]:
    """(query, JSON body, raw body) of an operation's call (see :func:`op_wire`)."""
    op = call.op
    if op is None:
        return call.params, call.json, call.content
    path, rest, raw = op_wire(op.op)  # type: ignore[attr-defined]
    content = bytes(getattr(op, raw)) if raw is not None else None
    if call.method == "POST":
        body = op.model_dump(mode="json", include=set(rest), exclude_unset=True)
        return call.params, body or None, content
    params = list(call.params)
    for name in rest:
        value = getattr(op, name)
        if value is None:
            continue
        fmt = QUERY_FORMAT.get(name, _query_str)
        params.append((name, fmt(value)))
    return tuple(params), None, content


def op_result(response: httpx.Response, op: Op[R_]) -> R_:
    """The reply of an operation's call as its result type (``OPS``: a model, bytes or none)."""
    result = OPS[op.op].result  # type: ignore[attr-defined]
    if result is bytes:
        return cast(R_, response.content)
    if result is type(None):
        return cast(R_, None)
    return cast(R_, parse(response, result))


def exec_request(
    command: str | list[str] | ExecRequest,
    *,
    shell: bool | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin: str | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT,
) -> ExecRequest:
    """The :class:`ExecRequest` for the keyword arguments of ``exec``/``stream_exec``."""
    if isinstance(command, ExecRequest):
        return command
    return ExecRequest(
        command=command,
        shell=shell,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdin=stdin,
        timeout=timeout,
        max_output_bytes=max_output_bytes,
    )


def dataplane_grant(sandbox_id: str) -> Call:
    """``POST /v1/sandboxes/{id}/dataplane``: the node's address and a token for this sandbox."""
    return Call("POST", _sandbox(sandbox_id, "dataplane"))


def ray_transport() -> Callable[..., Any]:
    """The Ray transport's factory (``ray_client(cls, namespace, retry=, token=)``).

    It lives with the server code (only ``deployments/`` imports Ray) and is found through the
    ``rock_serve.sdk.transports`` entry point named ``ray``, so the SDK imports nothing of the
    server. An install whose metadata predates the entry point falls back to the module the
    entry point names.

    Raises:
        RuntimeUnavailable: the server code (the ``server`` extra) is not installed.
    """
    from importlib import import_module, metadata

    target = RAY_TRANSPORT
    for entry in metadata.entry_points(group=TRANSPORTS_GROUP, name="ray"):
        target = entry.value
        break
    module, _, attr = target.partition(":")
    try:
        factory: Callable[..., Any] = getattr(import_module(module), attr)
    except ImportError as exc:
        raise RuntimeUnavailable(
            f"the Ray transport needs the server code: pip install 'rock-serve[server]' ({exc})"
        ) from None
    return factory


#: Entry-point group of the SDK's pluggable transports, and the Ray transport's default target.
TRANSPORTS_GROUP = "rock_serve.sdk.transports"
RAY_TRANSPORT = "rock_serve.deployments.client:ray_client"


# ---------------------------------------------------------------------------------------------
# Building httpx requests


def default_headers(settings: ClientSettings) -> dict[str, str]:
    """Headers sent with every request (auth when a token is set)."""
    headers = {"User-Agent": f"rock-serve-sdk/{__version__}", "Accept": "application/json"}
    if settings.token:
        headers["Authorization"] = f"Bearer {settings.token}"
    return headers


def request_kwargs(call: Call, settings: ClientSettings) -> dict[str, Any]:
    """Keyword arguments of ``httpx.Client.build_request`` (same for the async client)."""
    kwargs: dict[str, Any] = {"method": call.method, "url": call.path}
    params, body, content = op_rest(call)
    if params:
        kwargs["params"] = list(params)
    if body is not None:
        kwargs["json"] = body
    headers: dict[str, str] = {}
    if content is not None:
        kwargs["content"] = content
        headers["Content-Type"] = "application/octet-stream"
    if call.idempotency_key is not None:
        headers["Idempotency-Key"] = call.idempotency_key
    headers["traceparent"] = f"00-{call.trace_id}-{uuid.uuid4().hex[:16]}-01"
    kwargs["headers"] = headers
    if call.read_timeout != "default":
        kwargs["timeout"] = httpx.Timeout(settings.timeout, read=call.read_timeout)
    return kwargs


# ---------------------------------------------------------------------------------------------
# Responses


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date; None if absent."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def error_from_response(response: httpx.Response) -> RockError:
    """The typed exception for an error reply (its body must have been read).

    The one error body is mapped through :func:`rock_serve.errors.from_body`; a body that is not
    JSON (a proxy's HTML page, say) maps by HTTP status. A ``Retry-After`` header fills in
    ``retry_after`` when the body does not give one.
    """
    try:
        body: Any = json.loads(response.content) if response.content else None
    except (ValueError, UnicodeDecodeError):
        body = response.content.decode("utf-8", "replace")
    error = from_body(body, status=response.status_code)
    if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
        error.details["upstream"] = True  # not our server's answer: a proxy's, mid-failure
    # from_body passes the body's retry_after through as it came; keep only a usable number.
    raw: object = error.retry_after
    if raw is not None and not isinstance(raw, int | float):
        error.retry_after = parse_retry_after(str(raw))
    if error.retry_after is None:
        error.retry_after = parse_retry_after(response.headers.get("Retry-After"))
    return error


class Held(httpx.Response):
    """A successful reply a transport holds as a value, never encoded (the Ray transport gets
    the result model from the Worker): :func:`parse` returns it as it is, ``content`` is its
    bytes (or JSON). Nothing of httpx's body machinery runs: no HTTP was involved.
    """

    def __init__(self, value: Any) -> None:  # noqa: D107 - no super().__init__: see above
        self.value = value
        self.status_code = 204 if value is None else 200
        self.headers = httpx.Headers()
        self.extensions = {}

    @property
    def content(self) -> bytes:
        """The value as a body: bytes as they are, a model as JSON, nothing for none."""
        if isinstance(self.value, bytes):
            return self.value
        if isinstance(self.value, BaseModel):
            return self.value.model_dump_json().encode()
        return b""


def build(model: type[M], **fields: Any) -> M:
    """A request model from its fields, as the server would validate it.

    Raises:
        InvalidImageReference: a malformed image reference (a validator's own error type is
            raised as its typed error, the one the server would answer).
        pydantic.ValidationError: any other schema violation, as pydantic reports it.
    """
    try:
        return model(**fields)
    except ValidationError as exc:
        error = from_validation(exc.errors())
        if type(error) is InvalidRequest:
            raise
        raise error from None


def parse(response: httpx.Response, model: type[M]) -> M:
    """The reply body as ``model``; a body that does not fit is an :class:`InternalError`."""
    if isinstance(response, Held) and isinstance(response.value, model):
        return response.value
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise InternalError(
            f"unexpected reply to {response.request.method} {response.request.url.path}: "
            f"{exc.error_count()} validation error(s) for {model.__name__}"
        ) from exc


R = TypeVar("R", ExecResult, SessionRunResult)


def parse_stream_line(line: str, final: type[R]) -> OutputChunk | R | None:
    """One NDJSON line of a streamed exec/run: a chunk, the final result, or None if blank.

    Raises:
        RockError: The line is an error body (the command failed mid-stream), or malformed.
    """
    if not line.strip():
        return None
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise InternalError(f"malformed stream line: {line[:200]!r}") from exc
    if not isinstance(item, dict):
        raise InternalError(f"malformed stream line: {line[:200]!r}")
    if "error" in item:
        raise from_body(item)
    try:
        if item.get("type") == "output":
            return OutputChunk.model_validate(item)
        return final.model_validate(item)
    except ValidationError as exc:
        raise InternalError(f"malformed stream line: {line[:200]!r}") from exc


def stream_ended_early() -> RockError:
    """The error for a stream that closed before its final result."""
    return InternalError("the stream ended before the command's result arrived")
