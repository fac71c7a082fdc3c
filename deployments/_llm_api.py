"""Model-service routes on the Admin (issue 15.3): the trainer's side of relay mode.

- ``POST /v1/llm/poll`` (:class:`LLMPollRequest` -> :class:`LLMCallList`): a long poll for the
  relayed calls of many sandboxes at once (one trainer connection multiplexes them); the
  sandboxes are grouped by Worker and each Worker is asked once.
- ``GET /v1/sandboxes/{id}/llm/calls?wait=&max_calls=`` -> :class:`LLMCallList`: one sandbox's.
- ``POST /v1/sandboxes/{id}/llm/calls/{call_id}`` (:class:`LLMAnswer`) -> 204: answer a call
  (404 ``not_found`` when it no longer waits: timed out, the agent left, answered already).
- ``POST /v1/sandboxes/{id}/llm/release`` (:class:`LLMRelease`) -> 204: hand polled calls that
  will not be answered back to the queue.
- ``GET /v1/sandboxes/{id}/llm/trajectory`` -> :class:`Trajectory`.

A poll whose HTTP client goes away while the Worker hands it calls releases them (nothing is
lost to a dropped long poll).

Namespaces as for every data-plane route (the Admin's guard). Wiring: ``admin.py`` includes
:data:`router` with one line.
"""

# No "from __future__ import annotations": FastAPI reads these annotations at include time.

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Concatenate, ParamSpec

from fastapi import APIRouter, Query, Request, Response

from rock_serve.deployments._auth import Auth
from rock_serve.deployments._llm import LLMWorker
from rock_serve.deployments._ray import call
from rock_serve.errors import SandboxNotFound
from rock_serve.protocol.llm import (
    MAX_POLL_CALLS,
    MAX_POLL_WAIT,
    LLMAnswer,
    LLMCall,
    LLMCallList,
    LLMPollRequest,
    LLMRelease,
    Trajectory,
)

__all__ = ["router"]

P = ParamSpec("P")

router = APIRouter(tags=["llm"])


def _admin() -> Any:
    from ray import serve  # lazily: only the replica has a replica context

    return serve.get_replica_context().servable_object


def _release(worker: Any, calls: list[LLMCall]) -> None:
    by_sandbox: dict[str, list[str]] = {}
    for c in calls:
        by_sandbox.setdefault(c.sandbox_id, []).append(c.call_id)
    for sandbox_id, ids in by_sandbox.items():
        asyncio.ensure_future(call(worker, LLMWorker.llm_release, sandbox_id, ids))


async def _poll(
    worker: Any,
    method: Callable[Concatenate[Any, P], Awaitable[list[LLMCall]]],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> list[LLMCall]:
    """A Worker poll whose calls go back to the queue if this request is cancelled."""
    task = asyncio.ensure_future(call(worker, method, *args, **kwargs))
    try:
        result: list[LLMCall] = await asyncio.shield(task)
        return result
    except asyncio.CancelledError:

        def done(t: asyncio.Future[Any]) -> None:
            if not t.cancelled() and t.exception() is None and t.result():
                _release(worker, t.result())

        task.add_done_callback(done)
        raise


@router.post("/v1/llm/poll", response_model=LLMCallList)
async def llm_poll(body: LLMPollRequest, principal: Auth) -> LLMCallList:
    """Wait up to ``wait`` s for relayed model calls of any of ``sandbox_ids``."""
    admin = _admin()
    groups: dict[Any, list[str]] = {}
    handles: dict[Any, Any] = {}
    for sandbox_id in dict.fromkeys(body.sandbox_ids):
        try:
            worker = await admin._worker(sandbox_id)
        except SandboxNotFound:
            continue  # gone (or not the caller's): its calls ended with it
        groups.setdefault(id(worker), []).append(sandbox_id)
        handles[id(worker)] = worker
    if not groups:
        raise SandboxNotFound("none of the sandboxes is live")
    results = await asyncio.gather(
        *(
            _poll(handles[key], LLMWorker.llm_poll_many, ids, body.wait, body.max_calls)
            for key, ids in groups.items()
        ),
        return_exceptions=True,
    )
    calls: list[LLMCall] = []
    errors = [r for r in results if isinstance(r, BaseException)]
    for r in results:
        if not isinstance(r, BaseException):
            calls.extend(r)
    if not calls and len(errors) == len(results):
        raise errors[0]
    return LLMCallList(calls=calls)


@router.get("/v1/sandboxes/{sandbox_id}/llm/calls", response_model=LLMCallList)
async def llm_calls(
    sandbox_id: str,
    principal: Auth,
    wait: Annotated[float, Query(ge=0, le=MAX_POLL_WAIT)] = 20.0,
    max_calls: Annotated[int, Query(ge=1, le=MAX_POLL_CALLS)] = 256,
) -> LLMCallList:
    """Wait up to ``wait`` s for the sandbox's relayed model calls."""
    worker = await _admin()._worker(sandbox_id)
    return LLMCallList(calls=await _poll(worker, LLMWorker.llm_poll, sandbox_id, wait, max_calls))


@router.post("/v1/sandboxes/{sandbox_id}/llm/release", status_code=204)
async def llm_release(sandbox_id: str, body: LLMRelease, principal: Auth) -> Response:
    """Hand polled calls that will not be answered back to the queue."""
    await _admin()._data(sandbox_id, LLMWorker.llm_release, body.call_ids)
    return Response(status_code=204)


@router.post("/v1/sandboxes/{sandbox_id}/llm/calls/{call_id}", status_code=204)
async def llm_answer(
    sandbox_id: str, call_id: str, body: LLMAnswer, principal: Auth, request: Request
) -> Response:
    """Answer one relayed call with a chat.completion object (or fail it)."""
    admin = _admin()
    async with admin._audited(request, principal, "llm.answer", sandbox_id):
        await admin._data(sandbox_id, LLMWorker.llm_answer, call_id, body)
    return Response(status_code=204)


@router.get("/v1/sandboxes/{sandbox_id}/llm/trajectory", response_model=Trajectory)
async def llm_trajectory(sandbox_id: str, principal: Auth) -> Trajectory:
    """The sandbox's recorded model calls (request/response pairs) so far."""
    trajectory: Trajectory = await _admin()._data(sandbox_id, LLMWorker.llm_trajectory)
    return trajectory
