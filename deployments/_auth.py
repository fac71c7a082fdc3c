"""The Admin's side of auth: the FastAPI dependency and the namespace checks.

``Auth`` (a route parameter) resolves the caller through the replica's
:class:`~rock_serve.auth.Authenticator`; the ``HTTPBearer`` security scheme documents it in the
OpenAPI schema. :class:`NamespaceGuard` answers "may this caller touch this sandbox?" for the
data plane, which goes straight to a Worker: it keeps a per-replica map sandbox id ->
namespace, filled from the Scheduler's ``get`` on first use (a sandbox's namespace never
changes, and ids are never reused), so a warm check is one dict lookup.

Credentials every client can carry (:func:`request_token`, first found wins):
``Authorization: Bearer T`` (our SDK), ``Authorization: Basic`` with T as the password (or as
the user name when the password is empty: ``http://user:T@host`` for header-less clients such
as rl-rock's ``RockEnv``), ``X-Key: T`` and ``XRL-Authorization: Bearer T`` (ROCK's SDK),
``X-API-Key: T`` (SWE-ReX's ``RemoteRuntime``), and ``?token=T`` on the route groups whose
schema documents it (SandboxFusion's ``/run_code``, whose clients cannot set headers). A token
in a URL is never logged: the audit log and metrics record route paths, never query strings.

Route groups (:func:`route_group`, from the matched route's path) let ``auth.anonymous`` open
chosen compatibility APIs to callers without a token, in one namespace per group.
"""

# No "from __future__ import annotations": FastAPI must see the real types of the dependency.

import base64
import binascii
import hmac
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Annotated, Any

from fastapi import Depends, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from rock_serve.auth import Principal, bearer_token
from rock_serve.errors import InternalError, PermissionDenied, RockError, SandboxNotFound
from rock_serve.protocol import SandboxRecord, SandboxSpec

__all__ = [
    "CSRF_COOKIE",
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "Auth",
    "NamespaceGuard",
    "authenticate",
    "authenticate_header_or_query",
    "caller",
    "check_cookie_request",
    "check_spec_privileges",
    "request_token",
    "route_group",
    "same_origin",
    "set_caller",
    "websocket_token",
]

#: The console's session cookie (HttpOnly, SameSite=Strict): the token itself.
SESSION_COOKIE = "rock_session"
#: The console's CSRF cookie (readable by its script) and the header that must repeat it.
CSRF_COOKIE = "rock_csrf"
CSRF_HEADER = "x-csrf-token"
#: Methods that change nothing (a viewer may call them; no CSRF header needed).
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: Most sandbox ids whose namespace one replica remembers (oldest forgotten first).
_CACHE_SIZE = 200_000

#: The caller of the request being served (see :func:`set_caller`). Only functions of this
#: module touch it: Serve pickles the Admin's routes by value, and a ContextVar does not pickle.
_CALLER: ContextVar[Principal | None] = ContextVar("rock_caller", default=None)

_bearer = HTTPBearer(
    auto_error=False,
    description="A rock-serve token (`rock token create`); not needed when auth is disabled.",
)


#: Route path prefixes of the compatibility APIs, by route group (see ``auth.anonymous``).
_GROUPS: tuple[tuple[str, str], ...] = (
    ("/apis/v1/envs/gem/", "gem"),
    ("/apis/envs/sandbox/v1/", "rock"),
    ("/run_code", "run_code"),
    ("/v1/sandboxes/{sandbox_id}/swerex", "swerex"),
)
#: Route groups whose schema documents the ``token`` query parameter.
_QUERY_GROUPS = frozenset({"run_code"})


def route_group(conn: HTTPConnection) -> str | None:
    """The route group of the matched route (None for the REST v1 core routes)."""
    route = conn.scope.get("route")
    path = getattr(route, "path", None) or ""
    for prefix, group in _GROUPS:
        if path.startswith(prefix):
            return group
    return None


def _basic_token(value: str) -> str | None:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, _, password = decoded.partition(":")
    return password or user or None


def request_token(conn: HTTPConnection, *, query: bool = False) -> str | None:
    """The credential a request carries, from any carrier a client can use (see the module
    docstring); ``query`` also reads ``?token=``. None when there is none.
    """
    headers = conn.headers
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        if scheme.lower() == "basic":
            token = _basic_token(value)
            if token:
                return token
    for name in ("x-key", "x-api-key"):
        value = (headers.get(name) or "").strip()
        if value:
            return bearer_token(value) or value
    xrl = headers.get("xrl-authorization")
    if xrl and xrl.strip():
        return bearer_token(xrl) or xrl.strip()
    if query:
        return conn.query_params.get("token") or None
    return None


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    """The caller of this request (the route dependency behind :data:`Auth`).

    Raises:
        Unauthorized: auth is required and the credential is missing or unknown.
    """
    from ray import serve  # here: the namespace checks below are usable without Ray

    admin: Any = serve.get_replica_context().servable_object
    group = route_group(request)
    token = request_token(request, query=group in _QUERY_GROUPS)
    try:
        if token is None and (token := request.cookies.get(SESSION_COOKIE)) is not None:
            check_cookie_request(request)  # the console's cookie: CSRF rules apply
        principal: Principal = admin.authenticator.authenticate(token, group)
        if request.method not in _SAFE_METHODS:
            principal.require_act(f"{request.method} {request.url.path}")
    except RockError as exc:
        admin.auth_failed(request, exc)
        raise
    request.state.principal = principal
    set_caller(principal)
    return principal


def same_origin(conn: HTTPConnection) -> bool:
    """True when the ``Origin`` header is absent or names this very host."""
    origin = conn.headers.get("origin")
    if origin is None:
        return True
    host = conn.headers.get("host", "")
    return origin.partition("://")[2].rstrip("/") == host


def check_cookie_request(conn: HTTPConnection) -> None:
    """CSRF rules for a call authenticated by the console's session cookie.

    Any call: its ``Origin`` (when sent) must be this host. A state-changing HTTP call must
    also carry the ``X-CSRF-Token`` header equal to the ``rock_csrf`` cookie (double submit:
    another site can make the browser send cookies, never read them to set the header).

    Raises:
        PermissionDenied: cross-origin, or the CSRF token is missing or wrong.
    """
    if not same_origin(conn):
        raise PermissionDenied("cross-origin request with the console's cookie")
    if conn.scope["type"] == "http" and conn.scope.get("method") not in _SAFE_METHODS:
        sent = conn.headers.get(CSRF_HEADER, "")
        expected = conn.cookies.get(CSRF_COOKIE, "")
        if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
            raise PermissionDenied(f"missing or wrong {CSRF_HEADER} header (CSRF check)")


def websocket_token(ws: HTTPConnection) -> str | None:
    """A WebSocket's credential: bearer header, ``token`` query, or the console's cookie.

    Raises:
        PermissionDenied: the cookie came with a cross-origin ``Origin`` header.
    """
    token = request_token(ws, query=True)  # every carrier a client can put on a WebSocket
    if token is None and (token := ws.cookies.get(SESSION_COOKIE)) is not None:
        check_cookie_request(ws)
    return token


def check_spec_privileges(principal: Principal, spec: SandboxSpec) -> None:
    """Refuse spec fields that weaken containment to callers that are not admins.

    Raises:
        PermissionDenied: a non-admin token asked for ``seccomp: unconfined``,
            ``reverse_ports`` or a proxying ``model_service``.
    """
    if spec.seccomp != "default" and not principal.admin:
        raise PermissionDenied(
            f"seccomp {spec.seccomp!r} needs an admin token (token {principal.name!r} is not)"
        )
    if getattr(spec, "reverse_ports", None) and not principal.admin:
        # They connect from the node's own network: an operator's decision (issue 15.2).
        raise PermissionDenied(
            f"reverse_ports need an admin token (token {principal.name!r} is not)"
        )
    service = getattr(spec, "model_service", None)
    if service is not None and service.mode == "proxy" and not principal.admin:
        # The node itself sends the requests to base_url: from a tenant's token that would be
        # a request forger aimed at whatever the node can reach (issue 15.3).
        raise PermissionDenied(
            f"model_service mode 'proxy' needs an admin token (token {principal.name!r} is not)"
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

    For compatibility routes whose clients cannot set headers (SandboxFusion's /run_code):
    ``token`` documents the query parameter in the schema; :func:`authenticate` reads it on
    those routes (so a route's own ``Auth`` dependency sees the same caller).
    """
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

        Roles that see every namespace pass without a lookup. A sandbox of another namespace
        is reported exactly as an unknown one (404 ``sandbox_not_found``), so ids cannot be
        probed across namespaces.

        Raises:
            SandboxNotFound: unknown, or in a namespace the caller may not see.
        """
        if principal.all_namespaces:
            return
        if not principal.may_see(await self.namespace_of(sandbox_id)):
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")

    @staticmethod
    def check_namespace_filter(principal: Principal, namespace: str | None) -> str | None:
        """The namespace a list call is limited to (None = all, for admins).

        Raises:
            PermissionDenied: a non-admin asked for another namespace.
        """
        if principal.all_namespaces:
            return namespace
        if namespace is not None and namespace != principal.namespace:
            raise PermissionDenied(
                f"token {principal.name!r} may only list namespace {principal.namespace!r}"
            )
        return principal.namespace
