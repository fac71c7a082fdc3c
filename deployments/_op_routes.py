"""One route declaration per operation, served by the Admin and by the direct data plane.

An operation's REST route is its :data:`~rock_serve.protocol.ops.OPS` row (method, path
template) read against its model's fields (:func:`route_of`): a ``{name}`` in the path is that
field; for GET/DELETE, and for a route whose model takes a raw body (``Op.upload``: the payload
field is the request body), the other fields are query parameters; else they are the JSON body.
An idempotent operation takes the ``Idempotency-Key`` header as its key; one that streams
output items answers NDJSON with ``?stream=true``; one that streams bytes answers them as they
come. :meth:`OpRoute.build` makes the operation from a request once.

Both apps mount every route from here, each with its own :class:`Sender` (how it runs an
operation: the Admin through the Worker actor, the data plane on its own Worker) and its own
auth and audit: :func:`mount_fastapi` (the Admin; the OpenAPI schema has each route's
parameters, body, response model and the one error body) and :func:`starlette_routes` (the
node's data plane). Adding an operation to ``OPS`` adds its route to both.
"""

# No "from __future__ import annotations": FastAPI reads the endpoints' real annotations.

import inspect
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError, create_model
from starlette.routing import Route

from rock_serve.deployments._relays import ndjson, relay
from rock_serve.errors import InvalidRequest, RuntimeUnavailable
from rock_serve.protocol._base import WireModel
from rock_serve.protocol.ops import OPS, Op, OpSpec, Streams

__all__ = [
    "NDJSON",
    "OpRoute",
    "Sender",
    "audit_fields",
    "bind_admin",
    "reply",
    "serve_op",
    "mount_fastapi",
    "route_of",
    "routes",
    "starlette_routes",
]

NDJSON = "application/x-ndjson"
_PARAM = re.compile(r"\{(\w+)\}")
#: Query parameters carried as octal text (permission bits: ``?mode=644``).
_OCTAL = frozenset({"mode"})
_NONE = type(None)


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: {e['msg']}" for e in exc.errors()
    )


_BODIES: dict[type, type[BaseModel]] = {}


def _body_model(model: type[Op[Any]], names: list[str]) -> type[BaseModel]:
    """The JSON body of ``model``'s route: the request model it extends when that has exactly
    these fields (``ExecOp`` -> ``ExecRequest``), else a model of these fields.
    """
    known = _BODIES.get(model)
    if known is not None:
        return known
    body: type[BaseModel] | None = None
    for base in model.__mro__[1:]:
        if (
            isinstance(base, type)
            and issubclass(base, WireModel)
            and not issubclass(base, Op | Streams)
            and base is not WireModel
            and set(base.model_fields) == set(names)
        ):
            body = base
            break
    if body is None:
        fields: dict[str, Any] = {
            n: (model.model_fields[n].annotation, model.model_fields[n]) for n in names
        }
        name = model.__name__.removesuffix("Op") + "Body"
        body = create_model(name, __base__=WireModel, __doc__=model.__doc__, **fields)
    _BODIES[model] = body
    return body


@dataclass(frozen=True)
class OpRoute:
    """Where each field of an operation comes from in its REST request."""

    spec: OpSpec
    method: str
    path: str
    #: Fields taken from path segments (besides ``sandbox_id``).
    path_params: tuple[str, ...]
    #: Fields taken from query parameters.
    query: tuple[str, ...]
    #: The JSON body's model (None: no body, or a raw one).
    body: type[BaseModel] | None
    #: The field taken from the raw request body.
    raw: str | None
    #: ``?stream=true`` answers NDJSON items (output chunks, then the result).
    ndjson: bool
    #: The reply is the operation's bytes, streamed as they come.
    raw_stream: bool

    @property
    def tag(self) -> str:
        """The operation's tag."""
        return str(self.spec.model.model_fields["op"].default)

    @property
    def status(self) -> int:
        """The status of a reply that is not streamed."""
        return 204 if self.spec.result is _NONE else 200

    @property
    def media_type(self) -> str:
        """The content type of a raw reply."""
        return str(getattr(self.spec.model, "media_type", "application/octet-stream"))

    def build(
        self,
        path_params: Mapping[str, str],
        query: Mapping[str, str],
        body: Mapping[str, Any] | None = None,
        raw: bytes | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[Op[Any], bool]:
        """The operation of one request, and whether it asked for NDJSON.

        Raises:
            InvalidRequest: the request does not make a valid operation.
        """
        fields: dict[str, Any] = dict(body or {})
        for name in self.path_params:
            fields[name] = path_params[name]
        for name in self.query:
            value = query.get(name)
            if value is None or value == "":
                continue
            if name in _OCTAL:
                try:
                    fields[name] = int(value, 8)
                except ValueError:
                    raise InvalidRequest(f"{name} {value!r} is not octal") from None
            else:
                fields[name] = value
        if self.raw is not None:
            fields[self.raw] = raw if raw is not None else b""
        if idempotency_key is not None and self.spec.model.idempotent:
            if not 1 <= len(idempotency_key) <= 128 or not idempotency_key.isprintable():
                raise InvalidRequest("Idempotency-Key must be 1 to 128 printable characters")
            fields["idempotency_key"] = idempotency_key
        try:
            operation = self.spec.model.model_validate(fields)
        except ValidationError as exc:
            raise InvalidRequest(f"invalid {self.spec.model.__name__}: {_problems(exc)}") from None
        return operation, self.ndjson and query.get("stream") == "true"


def route_of(spec: OpSpec) -> OpRoute:
    """The route of one ``OPS`` row, read against its model's fields."""
    method, path = spec.route
    model = spec.model
    segments = tuple(n for n in _PARAM.findall(path) if n != "sandbox_id")
    rest = [
        n for n in model.model_fields if n not in ("op", "idempotency_key") and n not in segments
    ]
    raw = model.payload if model.upload else None
    if raw is not None:
        rest.remove(raw)
    in_query = method in ("GET", "DELETE") or raw is not None
    return OpRoute(
        spec=spec,
        method=method,
        path=path,
        path_params=segments,
        query=tuple(rest) if in_query else (),
        body=_body_model(model, rest) if rest and not in_query else None,
        raw=raw,
        ndjson=spec.item is not None and spec.item is not bytes,
        raw_stream=spec.item is bytes,
    )


def routes() -> list[OpRoute]:
    """Every operation's route (from ``OPS`` as it is now)."""
    return [route_of(spec) for spec in OPS.values()]


def audit_fields(operation: Op[Any], streamed: bool = False) -> dict[str, Any]:
    """The audit fields of an operation: command, env keys, session, path, and in ``detail``
    its flags and the size of its payload; never a value (env values, stdin, file bytes).
    """
    kind = type(operation)
    names = kind.model_fields
    fields: dict[str, Any] = {}
    for name in ("command", "session", "path"):
        if name in names:
            fields[name] = getattr(operation, name)
    startup: list[str] | None = getattr(operation, "startup_commands", None)
    if startup:  # what a session's creation runs
        fields["command"] = "\n".join(startup)
    if "env" in names:
        fields["env_keys"] = sorted(getattr(operation, "env", None) or {})
    detail: dict[str, Any] = {}
    item = OPS[str(getattr(operation, "op", ""))].item
    if item is not None and item is not bytes:
        detail["stream"] = streamed
    for name, info in names.items():
        value = getattr(operation, name)
        if info.annotation in (bool, "bool") or name in ("cwd", "mode"):
            detail[name] = value
    if kind.payload is not None:
        value = getattr(operation, kind.payload)
        size = len(value.encode() if isinstance(value, str) else value or b"")
        detail["bytes" if kind.payload == "data" else f"{kind.payload}_bytes"] = size
    if detail:
        fields["detail"] = detail
    return fields


# ---------------------------------------------------------------------------- serving


class Sender(Protocol):
    """How one app runs an operation and renders what it gets."""

    async def op(self, sandbox_id: str, operation: Op[Any]) -> Any:
        """Run one operation."""

    def op_stream(self, sandbox_id: str, operation: Any) -> AsyncIterator[Any]:
        """Run one streaming operation, item by item."""


def reply(route: OpRoute, result: Any) -> Response:
    """The reply of a result that is not streamed (204 for none, raw bytes or JSON)."""
    if route.status == 204 or result is None:
        return Response(status_code=204)
    if isinstance(result, bytes):
        return Response(result, media_type=route.media_type)
    return Response(result.model_dump_json(), media_type="application/json")


async def serve_op(
    route: OpRoute,
    sender: Sender,
    sandbox_id: str,
    operation: Op[Any],
    streamed: bool,
    event: dict[str, Any] | None = None,
) -> Response:
    """Run ``operation`` through ``sender`` and render its reply (``event``: the audit event,
    which gets the result's exit code).
    """
    if route.raw_stream:
        return await relay(sender.op_stream(sandbox_id, operation), route.media_type)
    if streamed:
        return await ndjson(sender.op_stream(sandbox_id, operation))
    result = await sender.op(sandbox_id, operation)
    if event is not None and hasattr(result, "exit_code"):
        event["detail"]["exit_code"] = result.exit_code
    return reply(route, result)


# ---------------------------------------------------------------------------- the Admin


#: ``(route, request, principal, sandbox_id, operation, streamed) -> reply``: the Admin's own
#: checks, audit and sending around one operation.
AdminServe = Callable[[OpRoute, Request, Any, str, Op[Any], bool], Awaitable[Response]]


#: The Admin of this replica (``bind_admin``); its routes serve through it.
_ADMIN: list[AdminServe] = []


def bind_admin(serve: AdminServe) -> None:
    """Serve the Admin app's operation routes through ``serve`` (the replica's Admin).

    A module-level binding, as the other routers' ``bind``: Serve pickles the app and the Admin
    class to the replica, and this module is the one both see by reference.
    """
    _ADMIN[:] = [serve]


async def _admin_serve(
    route: OpRoute, request: Request, principal: Any, sandbox_id: str, op: Op[Any], streamed: bool
) -> Response:
    if not _ADMIN:  # pragma: no cover - the replica builds its Admin before serving
        raise RuntimeUnavailable("the Admin is starting")
    return await _ADMIN[0](route, request, principal, sandbox_id, op, streamed)


def _constraints(info: Any) -> dict[str, Any]:
    """A string field's constraints (pattern, lengths), for its path or query parameter."""
    out: dict[str, Any] = {}
    for constraint in info.metadata:
        for attr in ("pattern", "min_length", "max_length"):
            if getattr(constraint, attr, None) is not None:
                out[attr] = getattr(constraint, attr)
    return out


def _query_param(route: OpRoute, name: str) -> inspect.Parameter:
    info = route.spec.model.model_fields[name]
    required = info.is_required()
    meta: dict[str, Any] = {"description": info.description}
    if name in _OCTAL:
        meta["pattern"] = r"^[0-7]{1,4}$"
        meta["description"] = f"{info.description} Octal, e.g. 644."
    meta.update(_constraints(info))
    annotation: Any = Annotated[str if required else str | None, Query(**meta)]
    default = inspect.Parameter.empty if required else None
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def _admin_endpoint(route: OpRoute, serve: AdminServe, auth: Any) -> Callable[..., Any]:
    async def endpoint(request: Request, principal: Any, sandbox_id: str, **values: Any) -> Any:
        body = values.pop("body", None)
        key = values.pop("idempotency_key", None)
        operation, streamed = route.build(
            request.path_params,
            request.query_params,
            body.model_dump() if body is not None else None,
            await request.body() if route.raw is not None and not route.spec.model.upload else None,
            key,
        )
        return await serve(route, request, principal, sandbox_id, operation, streamed)

    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("request", kw, annotation=Request),
        inspect.Parameter("principal", kw, annotation=auth),
        inspect.Parameter("sandbox_id", kw, annotation=str),
    ]
    for name in route.path_params:
        info = route.spec.model.model_fields[name]
        param = PathParam(description=info.description, **_constraints(info))
        params.append(inspect.Parameter(name, kw, annotation=Annotated[str, param]))
    params += [_query_param(route, name) for name in route.query]
    if route.body is not None:
        params.append(inspect.Parameter("body", kw, annotation=route.body))
    if route.ndjson:
        params.append(
            inspect.Parameter(
                "stream",
                kw,
                default=False,
                annotation=Annotated[
                    bool, Query(description="Stream NDJSON OutputChunk lines, then the result.")
                ],
            )
        )
    if route.spec.model.idempotent:
        params.append(
            inspect.Parameter(
                "idempotency_key",
                kw,
                default=None,
                annotation=Annotated[
                    str | None,
                    Header(
                        alias="Idempotency-Key",
                        description="Run once per key: a resend gets the first run's result.",
                    ),
                ],
            )
        )
    endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    endpoint.__name__ = route.tag.replace(".", "_")
    endpoint.__doc__ = route.spec.model.__doc__
    return endpoint


def mount_fastapi(
    app: FastAPI,
    auth: Any,
    errors: dict[int | str, dict[str, Any]],
    serve: AdminServe | None = None,
) -> None:
    """Add every operation's route to the Admin's app (``auth``: its caller dependency);
    they serve through ``serve``, else through the Admin bound with :func:`bind_admin`.
    """
    serve = serve or _admin_serve
    for route in routes():
        responses: dict[int | str, dict[str, Any]] = dict(errors)
        kwargs: dict[str, Any] = {}
        result = route.spec.result
        if route.raw_stream:
            kwargs["response_class"] = Response
            responses[200] = {"content": {route.media_type: {}}}
        elif route.status == 204:
            kwargs["status_code"] = 204
            kwargs["response_class"] = Response
        else:
            kwargs["response_model"] = result
        if route.ndjson:
            responses[200] = {
                "description": "JSON; with `stream=true` NDJSON: OutputChunk lines, then the "
                "result (or an error body line).",
                "content": {NDJSON: {"schema": {"type": "string"}}},
            }
        if route.raw is not None:
            kwargs["openapi_extra"] = {
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        }
                    },
                }
            }
        app.add_api_route(
            route.path,
            _admin_endpoint(route, serve, auth),
            methods=[route.method],
            responses=responses,
            summary=route.tag,
            **kwargs,
        )


# ---------------------------------------------------------------------------- the data plane


def _json_body(route: OpRoute, data: bytes) -> dict[str, Any]:
    """The JSON body's fields, validated once, with the operation (see :meth:`OpRoute.build`).

    Raises:
        InvalidRequest: not a JSON object, or a field the body does not have.
    """
    try:
        body = json.loads(data or b"{}")
    except ValueError as exc:
        raise InvalidRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    assert route.body is not None
    unknown = set(body) - set(route.body.model_fields)
    if unknown:
        raise InvalidRequest(f"unknown fields in the body: {', '.join(sorted(unknown))}")
    return body


#: ``(route, request, sandbox_id, claims) -> reply``: the data plane's own audit and sending.
DirectServe = Callable[[OpRoute, Any, str, Op[Any], bool, Any], Awaitable[Response]]


def starlette_routes(
    serve: DirectServe,
    wrap: Callable[..., Callable[[Any], Awaitable[Response]]],
) -> list[Route]:
    """Every operation's route for the data plane's Starlette app; ``wrap(handler, raw=...)``
    adds the token check, the size limit and the error body.
    """
    out: list[Route] = []
    for route in routes():

        async def handler(
            request: Any, sandbox_id: str, claims: Any, route: OpRoute = route
        ) -> Response:
            body: Any = None
            raw: bytes | None = None
            if route.body is not None:
                body = _json_body(route, await request.body())
            elif route.raw is not None:
                raw = await request.body()
            operation, streamed = route.build(
                request.path_params,
                request.query_params,
                body,
                raw,
                request.headers.get("idempotency-key"),
            )
            return await serve(route, request, sandbox_id, operation, streamed, claims)

        out.append(
            Route(route.path, wrap(handler, raw=route.raw is not None), methods=[route.method])
        )
    return out
