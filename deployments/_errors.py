"""Error rendering of the Admin (and of any FastAPI app it composes): every error, ours or
FastAPI's, leaves as the one body ``{"error": {"code", "message", "retry_after"?}}`` with the
status of the table in ``rock_serve/errors.py`` and, on 429/503, a ``Retry-After`` header.

Moved out of ``admin.py`` unchanged (issue 13 item 5); :func:`install` registers the handlers
that were decorators there. Errors are counted by route and code in the Admin's metrics.
"""

# No "from __future__ import annotations": FastAPI reads handler annotations at run time.

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rock_serve.deployments._metrics import Metrics, metrics
from rock_serve.errors import ErrorCode, RockError, from_validation, http_status, to_body

__all__ = ["admin_metrics", "error_response", "install"]

log = logging.getLogger("rock_serve.deployments.admin")


def error_response(exc: BaseException) -> JSONResponse:
    """The one error body, with the table's status and Retry-After on 429/503."""
    body = to_body(exc)
    status = http_status(body["error"]["code"])
    headers: dict[str, str] = {}
    retry_after = body["error"].get("retry_after")
    if retry_after is not None and status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(float(retry_after))))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="rock-serve"'
    return JSONResponse(body, status_code=status, headers=headers)


_METRICS: list[Metrics] = []
#: Codes counted by caller namespace too (``rock_rejected_total``).
_REJECTED = {ErrorCode.UNAUTHORIZED.value, ErrorCode.PERMISSION_DENIED.value, "rate_limited"}


def admin_metrics() -> Metrics:
    """The Admin's metrics (made once per replica process)."""
    if not _METRICS:
        _METRICS.append(metrics("admin"))
    return _METRICS[0]


def _count_error(request: Request, code: str) -> None:
    """Errors by route and code on the Admin; refusals also by the caller's namespace."""
    route = request.scope.get("route")
    admin_metrics().error(getattr(route, "path", "unmatched"), code)
    if code in _REJECTED:
        principal = getattr(request.state, "principal", None)
        admin_metrics().rejected(principal.namespace if principal else "-", code)


async def _rock_error(request: Request, exc: RockError) -> JSONResponse:
    _count_error(request, exc.code.value)
    return error_response(exc)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    error = from_validation(exc.errors())  # invalid_request, or a validator's own code (422)
    _count_error(request, error.code.value)
    return error_response(error)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = ErrorCode.NOT_FOUND if exc.status_code == 404 else ErrorCode.INVALID_REQUEST
    return JSONResponse(
        {"error": {"code": code.value, "message": str(exc.detail)}}, status_code=exc.status_code
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    _count_error(request, ErrorCode.INTERNAL.value)
    return error_response(exc)


def install(app: FastAPI) -> None:
    """Render every error of ``app`` as the one error body (and count it)."""
    app.add_exception_handler(RockError, _rock_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
