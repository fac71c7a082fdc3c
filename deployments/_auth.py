"""The Admin's side of auth: the FastAPI dependency and the namespace checks.

``Auth`` (a route parameter) resolves the caller through the replica's
:class:`~rock_serve.auth.Authenticator`; the ``HTTPBearer`` security scheme documents it in the
OpenAPI schema. :class:`NamespaceGuard` answers "may this caller touch this sandbox?" for the
data plane, which goes straight to a Worker: it keeps a per-replica map sandbox id ->
namespace, filled from the Scheduler's ``get`` on first use (a sandbox's namespace never
changes, and ids are never reused), so a warm check is one dict lookup.
"""

# No "from __future__ import annotations": FastAPI must see the real types of the dependency.

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Annotated, Any

from fastapi import Depends, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from rock_serve.auth import Principal
from rock_serve.errors import InternalError, PermissionDenied, RockError, SandboxNotFound
from rock_serve.protocol import SandboxRecord, SandboxSpec

__all__ = [
    "Auth",
    "NamespaceGuard",
    "authenticate",
    "authenticate_header_or_query",
    "caller",
    "check_spec_privileges",
    "set_caller",
]

#: Most sandbox ids whose namespace one replica remembers (oldest forgotten first).
_CACHE_SIZE = 200_000

#: The caller of the request being served (see :func:`set_caller`). Only functions of this
#: module touch it: Serve pickles the Admin's routes by value, and a ContextVar does not pickle.
_CALLER: ContextVar[Principal | None] = ContextVar("rock_caller", default=None)

_bearer = HTTPBearer(
    auto_error=False,
    description="A rock-serve token (`rock token create`); not needed when auth is disabled.",
)


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    """The caller of this request (the route dependency behind :data:`Auth`).

    Raises:
        Unauthorized: auth is required and the bearer token is missing or unknown.
    """
    from ray import serve  # here: the namespace checks below are usable without Ray

    admin: Any = serve.get_replica_context().servable_object
    token = credentials.credentials if credentials is not None else None
    try:
        principal: Principal = admin.authenticator.authenticate(token)
    except RockError as exc:
        admin.auth_failed(request, exc)
        raise
    request.state.principal = principal
    set_caller(principal)
    return principal


def check_spec_privileges(principal: Principal, spec: SandboxSpec) -> None:
    """Refuse spec fields that weaken containment to callers that are not admins.

    Raises:
        PermissionDenied: a non-admin token asked for ``seccomp: unconfined``.
    """
    if spec.seccomp != "default" and not principal.admin:
        raise PermissionDenied(
            f"seccomp {spec.seccomp!r} needs an admin token (token {principal.name!r} is not)"
        )


def set_caller(principal: Principal) -> None:
    """Make ``principal`` the caller of the current request (its task and what it awaits)."""
    _CALLER.set(principal)


def caller() -> Principal:
    """The authenticated caller of the current request.

    Raises:
        InternalError: the route did not authenticate (a route without ``Auth``): the
            data plane fails closed.
    """
    principal = _CALLER.get()
    if principal is None:
        raise InternalError("this route does not authenticate its caller")
    return principal


#: A route parameter: the authenticated caller.
Auth = Annotated[Principal, Depends(authenticate)]


async def authenticate_header_or_query(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    token: Annotated[
        str | None,
        Query(description="The bearer token, for clients that cannot set headers."),
    ] = None,
) -> Principal:
    """:func:`authenticate`, also taking the token from a ``token`` query parameter.

    For compatibility routes whose clients cannot set headers (SandboxFusion's /run_code).
    """
    if credentials is None and token:
        credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)
    return await authenticate(request, credentials)


class NamespaceGuard:
    """Checks that a caller may act on a sandbox; remembers each sandbox's namespace."""

    def __init__(self, lookup: Callable[[str], Awaitable[SandboxRecord]]) -> None:
        """``lookup`` is the Scheduler's ``get`` (SandboxNotFound for unknown ids)."""
        self._lookup = lookup
        self._namespaces: OrderedDict[str, str] = OrderedDict()

    def remember(self, sandbox_id: str, namespace: str) -> None:
        """Note a sandbox's namespace (at create, or from a record already fetched)."""
        self._namespaces[sandbox_id] = namespace
        if len(self._namespaces) > _CACHE_SIZE:
            self._namespaces.popitem(last=False)

    async def namespace_of(self, sandbox_id: str) -> str:
        """The sandbox's namespace (cached; the Scheduler is asked once per id).

        Raises:
            SandboxNotFound: the Scheduler does not know the sandbox.
        """
        namespace = self._namespaces.get(sandbox_id)
        if namespace is None:
            try:
                record = await self._lookup(sandbox_id)
            except SandboxNotFound:
                raise SandboxNotFound(f"no sandbox {sandbox_id!r}") from None
            namespace = record.namespace
            self.remember(sandbox_id, namespace)
        return namespace

    async def check(self, principal: Principal, sandbox_id: str) -> None:
        """Allow the call, or raise as if the sandbox did not exist.

        Admins pass without a lookup. A sandbox of another namespace is reported exactly as an
        unknown one (404 ``sandbox_not_found``), so ids cannot be probed across namespaces.

        Raises:
            SandboxNotFound: unknown, or in a namespace the caller may not see.
        """
        if principal.admin:
            return
        if not principal.may_see(await self.namespace_of(sandbox_id)):
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")

    @staticmethod
    def check_namespace_filter(principal: Principal, namespace: str | None) -> str | None:
        """The namespace a list call is limited to (None = all, for admins).

        Raises:
            PermissionDenied: a non-admin asked for another namespace.
        """
        if principal.admin:
            return namespace
        if namespace is not None and namespace != principal.namespace:
            raise PermissionDenied(
                f"token {principal.name!r} may only list namespace {principal.namespace!r}"
            )
        return principal.namespace
