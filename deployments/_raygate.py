"""The Ray transport's entry point on the actors: the caller's token, checked and audited.

``AsyncClient.from_ray()`` / ``Client.from_ray()`` send every call through
``Scheduler.ray_call`` (control plane) or ``Worker.ray_call`` / ``Worker.ray_stream`` (data
plane) with the caller's platform token (``ROCK_TOKEN`` or the credentials file, as the HTTP
SDK finds it). :class:`RayGate` does there what the Admin does for HTTP:

- the token is checked by an :class:`~rock_serve.auth.Authenticator` built from the deployed
  ``auth`` config (so the token file must exist on every node that runs a Worker when auth is
  on): missing or unknown -> :class:`~rock_serve.errors.Unauthorized`, and an ``auth`` audit
  event;
- namespace scoping: creates land in the caller's namespace; a sandbox of another namespace is
  reported exactly as an unknown one (``sandbox_not_found``); non-admins list only their own
  namespace; admins pass;
- one :class:`~rock_serve.deployments._audit.AuditEvent` per mutating call, with the same
  action names as HTTP, ``client="ray"`` and ``detail.transport="ray"``;
- only the methods the SDK uses are reachable through it: sandbox operations as typed models
  (``Worker.ray_op`` / ``ray_op_stream``, see :mod:`rock_serve.protocol.ops`), the rest by name.
- one trace id per call, as over HTTP: the client's (sent through ``rock_traced``) or a new
  one, which reaches the rocklet and the log lines.

What it is not: a barrier against code that can reach Ray itself. Ray's own ports run code for
whoever holds Ray's token (``rock up`` turns Ray's token auth on and keeps them on loopback);
such code can call the actors' other methods directly. The gate gives the Ray transport the
platform's identities, namespaces and audit trail, for trainers that use it as meant.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from rock_serve.auth import Authenticator, Principal
from rock_serve.config import ServerArgs
from rock_serve.deployments._audit import AuditEvent, AuditLog
from rock_serve.deployments._auth import check_spec_privileges
from rock_serve.deployments._op_routes import audit_fields
from rock_serve.deployments._trace import TRACE_ID, new_trace_id, traced
from rock_serve.errors import (
    InvalidRequest,
    PermissionDenied,
    RockError,
    SandboxNotFound,
)
from rock_serve.protocol import SandboxRecord, validate_image_ref
from rock_serve.protocol.ops import OPS, Op

__all__ = ["CONTROL_METHODS", "DATA_METHODS", "STREAM_METHODS", "RayGate"]

#: Scheduler methods reachable over the Ray transport.
CONTROL_METHODS = frozenset(
    {
        *("health", "create", "get", "list", "delete", "delete_by_token"),
        *("fork", "pause", "resume"),
        *("snapshot", "snapshots", "get_snapshot", "delete_snapshot"),
    }
)
#: Worker methods reachable over the Ray transport -> their audit action (None: not audited).
DATA_METHODS: dict[str, str | None] = {
    "renew": None,
    # sandbox operations (exec, sessions, files, archives, stats) come through ``ray_op``
    "llm_poll": None,  # model service (issue 15.3)
    "llm_answer": "llm.answer",
    "llm_release": None,
    "llm_trajectory": None,
    # background processes (issue 15.1)
    "start_process": "process.start",
    "list_processes": None,
    "process_status": None,
    "process_input": "process.input",
    "signal_process": "process.signal",
    "kill_process": "process.kill",
    "wait_process": None,
}
#: Streaming Worker methods reachable over the Ray transport -> their audit action.
STREAM_METHODS: dict[str, str] = {
    "stream_process_output": "process.output",
}


def _fields(method: str, args: tuple[Any, ...]) -> dict[str, Any]:
    """The audit fields of a data-plane call (command, env keys, session, path; no values)."""
    first: Any = args[0] if args else None
    if method == "start_process":
        return {"command": first.command, "env_keys": sorted(first.env or {})}
    if method in ("process_input", "signal_process", "kill_process"):
        return {"detail": {"pid": first}}
    return {}


def _trace_call() -> None:
    """Give the Ray-transport call being served a trace id when its client sent none (each
    actor call runs in its own task: this sets it for that call only).
    """
    if traced() is None:
        TRACE_ID.set(new_trace_id())


class RayGate:
    """Token check, namespace scoping and audit for one actor's Ray-transport entry point."""

    def __init__(self, args: ServerArgs) -> None:
        self.args = args
        self._authenticator: Authenticator | None = None
        self._audit: AuditLog | None = None

    def use(self, args: ServerArgs) -> RayGate:
        """Follow a redeploy's args (a changed ``auth`` or ``audit`` is rebuilt on next use)."""
        if args is not self.args:
            if args.auth != self.args.auth:
                self._authenticator = None
            if args.audit != self.args.audit and self._audit is not None:
                old, self._audit = self._audit, None
                with contextlib.suppress(RuntimeError):  # no loop: nothing queued either
                    asyncio.get_running_loop().create_task(old.aclose())
            self.args = args
        return self

    @property
    def authenticator(self) -> Authenticator:
        """Built on first use (a Worker on a node without the token file fails only here).

        Raises:
            InvalidConfig: the token file is missing or bad on this node.
        """
        if self._authenticator is None:
            self._authenticator = Authenticator(self.args.auth)
        return self._authenticator

    @property
    def audit(self) -> AuditLog:
        """The actor's audit log (the sinks of the deployed ``audit`` config)."""
        if self._audit is None:
            self._audit = AuditLog(self.args.audit)
        return self._audit

    def authenticate(self, token: str | None) -> Principal:
        """The caller behind ``token``.

        Raises:
            Unauthorized: auth is required and the token is missing or unknown (audited).
        """
        try:
            return self.authenticator.authenticate(token)
        except RockError as exc:
            self.audit.record(
                AuditEvent(
                    action="auth",
                    token_name="-",
                    namespace="-",
                    status=exc.status,
                    code=exc.code.value,
                    client="ray",
                    detail={"transport": "ray"},
                )
            )
            raise

    def _namespace(self, principal: Principal, hint: str | None) -> str:
        """Where the caller's creates go: its token's namespace (with auth disabled, the
        client's ``tenant``).
        """
        if self.authenticator.required or not hint:
            return principal.namespace
        return hint

    @contextlib.asynccontextmanager
    async def audited(
        self,
        principal: Principal,
        action: str,
        sandbox_id: str | None = None,
        *,
        status: int = 200,
        **fields: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Record one audit event for the block (see :meth:`AuditLog.scope`)."""
        async with self.audit.scope(
            principal, action, sandbox_id, client="ray", status=status, **fields
        ) as event:
            event["detail"] = {**event["detail"], "transport": "ray"}
            yield event

    # ------------------------------------------------------------------ control plane

    async def control(
        self, scheduler: Any, token: str | None, method: str, args: tuple[Any, ...]
    ) -> Any:
        """A Scheduler call from the Ray transport (``scheduler`` is the Scheduler itself).

        Raises:
            Unauthorized: no or an unknown token while auth is required.
            InvalidRequest: ``method`` is not one the Ray transport offers.
            SandboxNotFound: unknown, or in a namespace the caller may not see.
            PermissionDenied: a non-admin asked to list another namespace.
        """
        _trace_call()
        if method not in CONTROL_METHODS:
            raise InvalidRequest(f"no Ray-transport method {method!r}")
        if method == "health":  # like GET /v1/health: no token needed; Workers for admins
            principal = (
                self.authenticate(token) if token or not self.authenticator.required else None
            )
            health = await scheduler.health()
            if principal is None or not principal.admin:
                return health.model_copy(update={"workers": []})
            return health
        principal = self.authenticate(token)
        if method == "create":
            req = args[0]
            if req.image is not None:  # a model_copy'd request skipped its validators
                validate_image_ref(req.image)  # malformed: invalid_image_reference (as REST)
            check_spec_privileges(principal, req)  # the Admin's rule, on this transport too
            namespace = self._namespace(principal, args[1] if len(args) > 1 else None)
            detail = {"owner": req.owner, "image": req.image, "network": req.network}
            async with self.audited(
                principal, "create", status=201, env_keys=sorted(req.env), detail=detail
            ) as event:
                record: SandboxRecord = await scheduler.create(req, namespace)
                event["sandbox_id"] = record.id
            return record
        if method == "get":
            return await self._visible(scheduler.get, principal, args[0])
        if method == "list":
            owner, state, labels = (list(args) + [None, None, None])[:3]
            wanted = args[3] if len(args) > 3 else None
            if not principal.admin:
                if wanted is not None and wanted != principal.namespace:
                    raise PermissionDenied(
                        f"token {principal.name!r} may only list namespace {principal.namespace!r}"
                    )
                wanted = principal.namespace
            return await scheduler.list(owner, state, labels, wanted)
        if method == "delete":
            async with self.audited(principal, "delete", args[0], status=204):
                await self._visible(scheduler.get, principal, args[0])
                await scheduler.delete(args[0])
            return None
        if method == "resume" and args[0] not in scheduler._records:  # archived (issue 16)
            async with self.audited(principal, method, args[0]):
                return await scheduler.resume(args[0], principal.namespace)
        if method in ("fork", "pause", "resume"):  # issue 16: in the sandbox's namespace
            record = await self._visible(scheduler.get, principal, args[0])
            async with self.audited(principal, method, args[0]):
                if method == "fork":
                    return await scheduler.fork(args[0], args[1], record.namespace)
                return await getattr(scheduler, method)(args[0], record.namespace)
        if method == "snapshot":  # issue 16: in the sandbox's namespace
            record = await self._visible(scheduler.get, principal, args[0])
            async with self.audited(principal, method, args[0]):
                return await scheduler.snapshot(args[0], args[1], record.namespace)
        if method in ("snapshots", "get_snapshot", "delete_snapshot"):  # the caller's namespace
            scope = None if principal.admin else principal.namespace
            if method == "snapshots":
                return await scheduler.snapshots(scope)
            if method == "delete_snapshot":
                async with self.audited(principal, "snapshot.delete", status=204):
                    return await scheduler.delete_snapshot(args[0], scope)
            return await scheduler.get_snapshot(args[0], scope)
        # delete_by_token
        namespace = self._namespace(principal, args[1] if len(args) > 1 else None)
        async with self.audited(
            principal, "delete", status=204, detail={"by": "client_token"}
        ) as event:
            event["sandbox_id"] = await scheduler.delete_by_token(args[0], namespace)
        return event["sandbox_id"]

    @staticmethod
    async def _visible(
        get: Callable[[str], Awaitable[SandboxRecord]], principal: Principal, sandbox_id: str
    ) -> SandboxRecord:
        record = await get(sandbox_id)
        if not principal.may_see(record.namespace):
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return record

    # ------------------------------------------------------------------ data plane

    async def _check(self, worker: Any, principal: Principal, sandbox_id: str) -> None:
        if not principal.admin:
            await self._visible(worker.get, principal, sandbox_id)

    async def data(
        self, worker: Any, token: str | None, method: str, sandbox_id: str, args: tuple[Any, ...]
    ) -> Any:
        """A Worker call from the Ray transport (``worker`` is the Worker itself).

        Raises:
            Unauthorized: no or an unknown token while auth is required.
            InvalidRequest: ``method`` is not one the Ray transport offers.
            SandboxNotFound: unknown, or in a namespace the caller may not see.
        """
        _trace_call()
        if method not in DATA_METHODS:
            raise InvalidRequest(f"no Ray-transport method {method!r}")
        principal = self.authenticate(token)
        action = DATA_METHODS[method]
        if action is None:
            await self._check(worker, principal, sandbox_id)
            return await getattr(worker, method)(sandbox_id, *args)
        async with self.audited(principal, action, sandbox_id, **_fields(method, args)):
            await self._check(worker, principal, sandbox_id)
            return await getattr(worker, method)(sandbox_id, *args)

    async def data_stream(
        self, worker: Any, token: str | None, method: str, sandbox_id: str, args: tuple[Any, ...]
    ) -> AsyncIterator[Any]:
        """A streaming Worker call from the Ray transport (see :meth:`data`)."""
        _trace_call()
        if method not in STREAM_METHODS:
            raise InvalidRequest(f"no Ray-transport stream {method!r}")
        principal = self.authenticate(token)
        fields = _fields(method, args)
        async with self.audited(principal, STREAM_METHODS[method], sandbox_id, **fields):
            await self._check(worker, principal, sandbox_id)
            async for item in getattr(worker, method)(sandbox_id, *args):
                yield item

    async def data_op(
        self, worker: Any, token: str | None, sandbox_id: str, operation: Op[Any]
    ) -> Any:
        """An operation from the Ray transport (``worker`` is the Worker itself): checked and
        audited as :meth:`data`, run by ``Worker.op``.

        Raises:
            Unauthorized: no or an unknown token while auth is required.
            InvalidRequest: ``operation`` is not an operation model.
            SandboxNotFound: unknown, or in a namespace the caller may not see.
        """
        _trace_call()
        spec = OPS.get(str(getattr(operation, "op", "")))
        if spec is None or type(operation) is not spec.model:
            raise InvalidRequest(f"not a sandbox operation: {type(operation).__name__}")
        principal = self.authenticate(token)
        if spec.audit is None:
            await self._check(worker, principal, sandbox_id)
            return await worker.op(sandbox_id, operation)
        async with self.audited(
            principal, spec.audit, sandbox_id, **audit_fields(operation, streamed=False)
        ):
            await self._check(worker, principal, sandbox_id)
            return await worker.op(sandbox_id, operation)

    async def data_op_stream(
        self, worker: Any, token: str | None, sandbox_id: str, operation: Any
    ) -> AsyncIterator[Any]:
        """A streaming operation from the Ray transport (see :meth:`data_op`)."""
        _trace_call()
        spec = OPS.get(str(getattr(operation, "op", "")))
        if spec is None or spec.item is None or type(operation) is not spec.model:
            raise InvalidRequest(f"not a streaming operation: {type(operation).__name__}")
        principal = self.authenticate(token)
        if spec.audit is None:
            await self._check(worker, principal, sandbox_id)
            async for item in worker.op_stream(sandbox_id, operation):
                yield item
            return
        async with self.audited(
            principal, spec.audit, sandbox_id, **audit_fields(operation, streamed=True)
        ):
            await self._check(worker, principal, sandbox_id)
            async for item in worker.op_stream(sandbox_id, operation):
                yield item
