"""Request body limits of the Admin: bodies over their limit get 413 ``too_large`` before a
route reads them. Moved out of ``admin.py`` unchanged (issue 13 item 5).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rock_serve.config import ServerArgs
from rock_serve.deployments._errors import admin_metrics, error_response
from rock_serve.errors import TooLarge

__all__ = ["BODY_LIMITS", "BodyLimit"]


#: The replica's body limits (set from ServerArgs by ``Admin.__init__``): JSON bodies, and the
#: streamed bodies of file/archive uploads.
BODY_LIMITS = {"request": ServerArgs().max_request_bytes, "file": ServerArgs().max_file_bytes}


def _streamed_body(scope: Scope) -> bool:
    """Routes whose body is streamed to the Worker (bounded by max_file_bytes, not held)."""
    path: str = scope.get("path", "")
    method: str = scope.get("method", "")
    if path.startswith("/v1/sandboxes/") and "/ports/" in path:
        return True  # relayed to a port in the sandbox with flow control (_ports_api.py)
    return (method == "PUT" and path.endswith(("/files", "/archive"))) or "upload" in path


class BodyLimit:
    """Refuse request bodies over their limit with 413 ``too_large`` before a route reads them.

    A declared Content-Length over the limit is refused at once; a chunked JSON body is read up
    to the limit (it would be read whole by the route anyway) and refused past it. Streamed
    upload bodies are only checked by their declared length here; the Worker counts the rest.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        streamed = _streamed_body(scope)
        limit = BODY_LIMITS["file" if streamed else "request"]
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                await self._refuse(scope, receive, send, f"of {int(declared)} bytes", limit)
                return
            await self.app(scope, receive, send)
            return
        if streamed or scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await self._refuse(scope, receive, send, "(chunked)", limit)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, what: str, limit: int) -> None:
        exc = TooLarge(f"request body {what} is over the {limit}-byte limit", limit=limit)
        admin_metrics().error("body_limit", exc.code.value)
        await error_response(exc)(scope, receive, send)
