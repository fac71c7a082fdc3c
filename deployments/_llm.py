"""The model service and reverse ports on the Worker (issue 15.2 reverse direction, 15.3).

A sandbox created with ``model_service`` gets, inside it, ``OPENAI_BASE_URL=
http://127.0.0.1:<port>/v1`` and a dummy per-sandbox ``OPENAI_API_KEY``. That port is a
:class:`~rock_serve.rocklet._reverse.ReverseTunnel` (the rocklet listens in the sandbox's own
network namespace, so ``network: none`` holds) to one HTTP server per Worker on the node's
loopback (uvicorn in the Worker's event loop). The server knows the sandbox by its key and
answers ``POST /v1/chat/completions`` (JSON, or SSE when ``stream`` is true; tool calls pass
through) by the sandbox's mode:

- ``relay``: the request becomes an :class:`LLMCall` that the trainer takes with a long poll
  (:meth:`LLMWorker.llm_poll`, many sandboxes per poll) and answers (:meth:`llm_answer`). The
  agent gets a 504 ``llm_timeout`` after ``timeout``; an agent that disconnects cancels its call;
  deleting the sandbox ends its calls. Nothing waits forever and nothing is kept after.
- ``proxy``: forwarded to ``base_url`` with ``api_key``, which never enters the sandbox.
- ``replay``: answered from recorded steps; a request that differs from the recorded one is a
  409 ``replay_diverged`` naming the step.

Every pair is recorded (:class:`TrajectoryStep`) under ``trajectory_id`` (the create field, else
the sandbox id): kept in memory while the sandbox lives, written as JSONL to
``llm.trajectory_dir`` and, when ``llm.s3_bucket`` is set, to S3 through boto3.

``reverse_ports`` on create are the generic form: each ``{port, target}`` relays connections to
``127.0.0.1:port`` in the sandbox to ``target`` (host:port) as seen from the node.

Wiring: the Worker class inherits :class:`LLMWorker` and calls :meth:`_llm_prepare` (before the
runtime creates the sandbox), :meth:`_llm_attach` (once its rocklet is up), and
:meth:`_llm_close` (on removal and failed creates).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import socket
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse, Response

from rock_serve.config import LLMConfig, ServerArgs
from rock_serve.deployments._trace import untraced_task
from rock_serve.errors import (
    InternalError,
    InvalidRequest,
    LLMTimeout,
    NotFound,
    RateLimited,
    ReplayDiverged,
    RockError,
    RuntimeUnavailable,
    SandboxNotFound,
    TooLarge,
)
from rock_serve.protocol import CreateSandboxRequest, SandboxSpec
from rock_serve.protocol.llm import (
    LLMAnswer,
    LLMCall,
    ModelServiceSpec,
    Trajectory,
    TrajectoryStep,
)
from rock_serve.rocklet._reverse import ReverseTunnel, tcp_connector
from rock_serve.rocklet.handle import RockletHandle
from rock_serve.runtime._sync import run_sync

__all__ = ["LLMWorker", "assemble_chunks", "completion_chunks", "load_trajectory"]

log = logging.getLogger(__name__)

#: How many ended call ids a service remembers (so a late answer says why it is refused).
_ENDED = 1024


@dataclass
class _Service:
    sandbox_id: str
    spec: ModelServiceSpec
    key: str
    trajectory_id: str
    steps: list[TrajectoryStep] = field(default_factory=list)
    queue: deque[LLMCall] = field(default_factory=deque)
    pending: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    calls: dict[str, LLMCall] = field(default_factory=dict)
    ended: OrderedDict[str, str] = field(default_factory=OrderedDict)
    tunnels: list[ReverseTunnel] = field(default_factory=list)
    reverse: list[tuple[int, str]] = field(default_factory=list)
    replay_pos: int = 0
    closed: bool = False
    dirty: bool = False
    writer: asyncio.Task[None] | None = None

    def end(self, call_id: str, why: str) -> None:
        self.pending.pop(call_id, None)
        self.calls.pop(call_id, None)
        self.ended[call_id] = why
        while len(self.ended) > _ENDED:
            self.ended.popitem(last=False)


def _oai_error(status: int, message: str, kind: str, code: str, **extra: Any) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code, **extra}}
    return JSONResponse(body, status_code=status)


def _error_response(exc: RockError) -> JSONResponse:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        409: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        504: "timeout",
    }.get(exc.status, "api_error")
    return _oai_error(exc.status, exc.message, kind, exc.code.value, **exc.details)


def completion_chunks(completion: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat.completion object as the chat.completion.chunk objects of its SSE stream."""
    base = {
        "id": completion.get("id", "chatcmpl-rock"),
        "object": "chat.completion.chunk",
        "created": completion.get("created", int(time.time())),
        "model": completion.get("model", ""),
    }
    out: list[dict[str, Any]] = []
    for choice in completion.get("choices") or []:
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": message.get("role", "assistant")}
        if message.get("content") is not None:
            delta["content"] = message["content"]
        if message.get("tool_calls"):
            delta["tool_calls"] = [
                {"index": i, **call} for i, call in enumerate(message["tool_calls"])
            ]
        out.append({**base, "choices": [{"index": index, "delta": delta, "finish_reason": None}]})
        finish = choice.get("finish_reason") or "stop"
        out.append({**base, "choices": [{"index": index, "delta": {}, "finish_reason": finish}]})
    if completion.get("usage") is not None:
        out.append({**base, "choices": [], "usage": completion["usage"]})
    return out


def assemble_chunks(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat.completion object that a list of chat.completion.chunk objects spells."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        for c in chunk.get("choices") or []:
            i = c.get("index", 0)
            st = choices.setdefault(
                i,
                {
                    "index": i,
                    "message": {"role": "assistant", "content": None},
                    "finish_reason": None,
                },
            )
            d = c.get("delta") or {}
            if d.get("content"):
                st["message"]["content"] = (st["message"]["content"] or "") + d["content"]
            for tc in d.get("tool_calls") or []:
                calls = st["message"].setdefault("tool_calls", [])
                idx = tc.get("index", len(calls))
                while len(calls) <= idx:
                    calls.append({"id": None, "type": "function", "function": {}})
                t = calls[idx]
                if tc.get("id"):
                    t["id"] = tc["id"]
                fn = tc.get("function") or {}
                for part in ("name", "arguments"):
                    if fn.get(part):
                        t["function"][part] = t["function"].get(part, "") + fn[part]
            if c.get("finish_reason"):
                st["finish_reason"] = c["finish_reason"]
    first = chunks[0] if chunks else {}
    return {
        "id": first.get("id", "chatcmpl-rock"),
        "object": "chat.completion",
        "created": first.get("created", int(time.time())),
        "model": first.get("model", ""),
        "choices": [choices[i] for i in sorted(choices)],
        "usage": usage,
    }


def _canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def _trajectory_dir(config: LLMConfig) -> str:
    return config.trajectory_dir or os.path.join(tempfile.gettempdir(), "rock-serve-trajectories")


def _safe_name(trajectory_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in trajectory_id).lstrip(".")


def _s3(config: LLMConfig) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=config.s3_endpoint)


def _write_trajectory(config: LLMConfig, trajectory_id: str, lines: bytes) -> None:
    """Blocking: write the JSONL file (atomically) and the S3 object."""
    directory = _trajectory_dir(config)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, _safe_name(trajectory_id) + ".jsonl")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(lines)
    os.replace(tmp, path)
    if config.s3_bucket:
        _s3(config).put_object(
            Bucket=config.s3_bucket,
            Key=config.s3_prefix + _safe_name(trajectory_id) + ".jsonl",
            Body=lines,
            ContentType="application/x-ndjson",
            Metadata={"trajectory-id": trajectory_id},
        )


def load_trajectory(config: LLMConfig, trajectory_id: str) -> list[TrajectoryStep]:
    """Blocking: the stored steps of a trajectory (S3 first when configured, then the dir).

    Raises:
        NotFound: stored nowhere.
    """
    data: bytes | None = None
    name = _safe_name(trajectory_id) + ".jsonl"
    if config.s3_bucket:
        client = _s3(config)
        try:
            data = client.get_object(Bucket=config.s3_bucket, Key=config.s3_prefix + name)[
                "Body"
            ].read()
        except client.exceptions.NoSuchKey:
            data = None
    if data is None:
        path = os.path.join(_trajectory_dir(config), name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise NotFound(f"no stored trajectory {trajectory_id!r}") from None
    return [TrajectoryStep.model_validate_json(line) for line in data.splitlines() if line]


class LLMWorker:
    """The Worker's model-service and reverse-port half (a mixin; see the module doc)."""

    args: ServerArgs
    name: str

    _llm_services: dict[str, _Service]
    _llm_keys: dict[str, _Service]
    _llm_waiters: set[asyncio.Future[None]]
    _llm_server: Any
    _llm_port: int
    _llm_http: Any
    _llm_ids: itertools.count[int]
    _llm_lock: asyncio.Lock

    def _llm_init(self) -> None:
        if not hasattr(self, "_llm_services"):
            self._llm_services = {}
            self._llm_keys = {}
            self._llm_waiters = set()
            self._llm_server = None
            self._llm_port = 0
            self._llm_http = None
            self._llm_ids = itertools.count(1)
            self._llm_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle hooks

    async def _llm_prepare(
        self, sandbox_id: str, req: CreateSandboxRequest, spec: SandboxSpec
    ) -> None:
        """Before the sandbox is made: set its OPENAI_* env and register its service."""
        self._llm_init()
        if req.model_service is None and not req.reverse_ports:
            return
        ports = [p.port for p in req.reverse_ports]
        if req.model_service is not None:
            ports.append(req.model_service.port)
        if len(set(ports)) != len(ports):
            raise InvalidRequest("reverse_ports and model_service.port must be distinct ports")
        ms = req.model_service or ModelServiceSpec()
        key = "sk-rock-" + secrets.token_urlsafe(24)
        svc = _Service(
            sandbox_id=sandbox_id,
            spec=ms,
            key=key,
            trajectory_id=req.trajectory_id or sandbox_id,
            reverse=[(p.port, p.target) for p in req.reverse_ports],
        )
        if req.model_service is not None:
            if ms.mode == "replay" and ms.replay is None:
                assert ms.replay_trajectory_id is not None
                ms.replay = await run_sync(load_trajectory, self.args.llm, ms.replay_trajectory_id)
            base = f"http://127.0.0.1:{ms.port}/v1"
            spec.env = {
                **spec.env,
                "OPENAI_BASE_URL": base,
                "OPENAI_API_BASE": base,
                "OPENAI_API_KEY": key,
            }
            self._llm_keys[key] = svc
        else:
            svc.spec = ms.model_copy(update={"port": 0})
        self._llm_services[sandbox_id] = svc

    def _llm_fork(self, parent_id: str, child_id: str) -> dict[str, str]:
        """A fork child of a sandbox with a model service gets one of its own: same mode and
        reverse ports, its own key and trajectory (the parent's recorded steps so far, so a
        replay or a trainer sees the child's history whole).

        Returns:
            The env the child's OPENAI_* entries must be overridden with (empty: no service).
        """
        parent = self._llm_services.get(parent_id) if hasattr(self, "_llm_services") else None
        if parent is None:
            return {}
        svc = _Service(
            sandbox_id=child_id,
            spec=parent.spec.model_copy(deep=True),
            key=parent.key,
            trajectory_id=child_id,
            steps=list(parent.steps),
            reverse=list(parent.reverse),
            replay_pos=parent.replay_pos,
        )
        env: dict[str, str] = {}
        if parent.key in self._llm_keys:  # a model service (not only reverse ports)
            svc.key = "sk-rock-" + secrets.token_urlsafe(24)
            self._llm_keys[svc.key] = svc
            env["OPENAI_API_KEY"] = svc.key
        self._llm_services[child_id] = svc
        return env

    def _llm_rekey(self, old: str, new: str) -> None:
        """The create was served from the warm pool: the sandbox has that one's id."""
        svc = self._llm_services.pop(old, None) if hasattr(self, "_llm_services") else None
        if svc is not None:
            svc.sandbox_id = new
            if svc.trajectory_id == old:
                svc.trajectory_id = new
            self._llm_services[new] = svc

    async def _llm_attach(self, sandbox_id: str, handle: RockletHandle) -> None:
        """Once the rocklet is up: open the sandbox's tunnels (the model service's, then the
        reverse ports).
        """
        svc = self._llm_services.get(sandbox_id) if hasattr(self, "_llm_services") else None
        if svc is None:
            return
        if svc.key in self._llm_keys:
            port = await self._llm_ensure_server()
            tunnel = ReverseTunnel(handle, svc.spec.port, tcp_connector("127.0.0.1", port))
            svc.tunnels.append(tunnel)
            await tunnel.start()
        for inner, target in svc.reverse:
            host, _, tport = target.rpartition(":")
            tunnel = ReverseTunnel(handle, inner, tcp_connector(host.strip("[]"), int(tport)))
            svc.tunnels.append(tunnel)
            await tunnel.start()

    async def _llm_close(self, sandbox_id: str) -> None:
        """The sandbox is going: close its tunnels, end its calls, write its trajectory."""
        svc = self._llm_services.pop(sandbox_id, None) if hasattr(self, "_llm_services") else None
        if svc is None:
            return
        svc.closed = True
        self._llm_keys.pop(svc.key, None)
        for fut in list(svc.pending.values()):
            if not fut.done():
                fut.set_exception(SandboxNotFound(f"sandbox {sandbox_id!r} was removed"))
        for call_id in list(svc.pending):
            svc.end(call_id, "the sandbox was removed")
        svc.queue.clear()
        await asyncio.gather(*(t.close() for t in svc.tunnels), return_exceptions=True)
        self._llm_wake()
        if svc.writer is not None:
            with contextlib.suppress(Exception):
                await svc.writer

    async def _llm_shutdown(self) -> None:
        """Stop the HTTP server and the proxy client (the Worker is going away)."""
        if not hasattr(self, "_llm_services"):
            return
        for sandbox_id in list(self._llm_services):
            await self._llm_close(sandbox_id)
        if self._llm_server is not None:
            server, task = self._llm_server
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
            self._llm_server = None
        if self._llm_http is not None:
            await self._llm_http.aclose()
            self._llm_http = None

    # ------------------------------------------------------------------ the HTTP server

    async def _llm_ensure_server(self) -> int:
        async with self._llm_lock:  # concurrent creates start one server
            return await self._llm_start_server()

    async def _llm_start_server(self) -> int:
        if self._llm_server is not None:
            return self._llm_port
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(
            self._llm_app(), log_level="warning", access_log=False, lifespan="off"
        )
        server = uvicorn.Server(config)
        task = untraced_task(server.serve(sockets=[sock]))  # outlives the call
        while not server.started and not task.done():
            await asyncio.sleep(0.005)
        if not server.started:
            sock.close()
            raise RuntimeUnavailable("the model service's HTTP server did not start")
        self._llm_server = (server, task)
        self._llm_port = sock.getsockname()[1]
        return self._llm_port

    def _llm_app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        def service(request: Request) -> _Service:
            auth = request.headers.get("authorization", "")
            key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            svc = self._llm_keys.get(key)
            if svc is None or svc.closed:
                raise _Unauthorized()
            return svc

        async def models(request: Request) -> Response:
            try:
                service(request)
            except _Unauthorized:
                return _oai_error(401, "unknown API key", "authentication_error", "invalid_api_key")
            return JSONResponse(
                {"object": "list", "data": [{"id": "rock", "object": "model", "owned_by": "rock"}]}
            )

        async def chat(request: Request) -> Response:
            try:
                svc = service(request)
            except _Unauthorized:
                return _oai_error(401, "unknown API key", "authentication_error", "invalid_api_key")
            raw = await request.body()
            if len(raw) > self.args.llm.max_request_bytes:
                return _error_response(TooLarge("the request body is too large"))
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                return _error_response(
                    InvalidRequest("the body must be a JSON object with messages")
                )
            if len(svc.steps) >= self.args.llm.max_steps:
                return _error_response(TooLarge("the trajectory is at llm.max_steps"))
            stream = bool(body.get("stream"))
            if svc.spec.mode == "proxy":
                return await self._llm_proxy(svc, body, stream)
            step = len(svc.steps)
            svc.steps.append(TrajectoryStep(request=body))
            disconnected = asyncio.ensure_future(_disconnect(request))
            try:
                answer = asyncio.ensure_future(self._llm_answer_for(svc, step, body))
                done, _ = await asyncio.wait(
                    {answer, disconnected}, return_when=asyncio.FIRST_COMPLETED
                )
                if answer not in done:
                    answer.cancel()
                    with contextlib.suppress(BaseException):
                        await answer
                    self._llm_record(svc, step, error={"code": "cancelled"})
                    return Response(status_code=499)
                completion = answer.result()
            except RockError as exc:
                self._llm_record(svc, step, error={"code": exc.code.value, "message": exc.message})
                return _error_response(exc)
            finally:
                disconnected.cancel()
            self._llm_record(svc, step, response=completion)
            if not stream:
                return JSONResponse(completion)
            return StreamingResponse(
                _sse(completion_chunks(completion)), media_type="text/event-stream"
            )

        return Starlette(
            routes=[
                Route("/v1/chat/completions", chat, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
            ]
        )

    def _llm_record(
        self,
        svc: _Service,
        step: int,
        *,
        response: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        svc.steps[step] = TrajectoryStep(
            request=svc.steps[step].request, response=response, error=error
        )
        svc.dirty = True
        if svc.writer is None or svc.writer.done():
            svc.writer = asyncio.ensure_future(self._llm_flush(svc))

    async def _llm_flush(self, svc: _Service) -> None:
        while svc.dirty:
            svc.dirty = False
            lines = b"".join(s.model_dump_json().encode() + b"\n" for s in svc.steps)
            try:
                await run_sync(_write_trajectory, self.args.llm, svc.trajectory_id, lines)
            except Exception as exc:  # storage trouble must not break the agent's calls
                log.warning("trajectory %s: cannot write: %s", svc.trajectory_id, exc)

    async def _llm_answer_for(
        self, svc: _Service, step: int, body: dict[str, Any]
    ) -> dict[str, Any]:
        if svc.spec.mode == "replay":
            # Calls that failed in the recorded run (timed out, cancelled) were asked again.
            recorded = [s for s in svc.spec.replay or [] if s.response is not None]
            pos = svc.replay_pos
            svc.replay_pos += 1
            if pos >= len(recorded):
                raise ReplayDiverged(
                    f"step {pos}: the recording has only {len(recorded)} steps", step=pos
                )
            if _canonical(recorded[pos].request) != _canonical(body):
                raise ReplayDiverged(
                    f"step {pos}: the request differs from the recorded one", step=pos
                )
            response = recorded[pos].response
            assert response is not None
            return response
        return await self._llm_relay(svc, step, body)

    async def _llm_relay(self, svc: _Service, step: int, body: dict[str, Any]) -> dict[str, Any]:
        if len(svc.pending) >= self.args.llm.max_pending_calls:
            raise RateLimited("too many model calls waiting for the trainer", retry_after=1.0)
        call_id = f"{svc.sandbox_id}.{next(self._llm_ids)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        call = LLMCall(call_id=call_id, sandbox_id=svc.sandbox_id, step=step, request=body)
        svc.pending[call_id] = fut
        svc.calls[call_id] = call
        svc.queue.append(call)
        self._llm_wake()
        why = "the agent disconnected"
        try:
            return await asyncio.wait_for(fut, svc.spec.timeout)
        except asyncio.TimeoutError:
            why = "it timed out"
            raise LLMTimeout(
                f"the trainer did not answer within {svc.spec.timeout:g} s", step=step
            ) from None
        finally:
            if call_id in svc.pending:
                svc.end(call_id, why)
            with contextlib.suppress(ValueError):
                svc.queue.remove(call)

    async def _llm_proxy(self, svc: _Service, body: dict[str, Any], stream: bool) -> Response:
        import httpx
        from starlette.responses import StreamingResponse

        if self._llm_http is None:
            self._llm_http = httpx.AsyncClient()
        assert svc.spec.base_url is not None
        url = svc.spec.base_url.rstrip("/") + "/chat/completions"
        sent = dict(body)
        if svc.spec.model:
            sent["model"] = svc.spec.model
        headers = {"authorization": f"Bearer {svc.spec.api_key}"} if svc.spec.api_key else {}
        step = len(svc.steps)
        svc.steps.append(TrajectoryStep(request=body))
        timeout = httpx.Timeout(svc.spec.timeout, connect=10.0)
        try:
            req = self._llm_http.build_request(
                "POST", url, json=sent, headers=headers, timeout=timeout
            )
            upstream = await self._llm_http.send(req, stream=True)
        except httpx.TimeoutException:
            exc: RockError = LLMTimeout(
                f"the model server did not answer within {svc.spec.timeout:g} s", step=step
            )
            self._llm_record(svc, step, error={"code": exc.code.value, "message": exc.message})
            return _error_response(exc)
        except httpx.HTTPError as err:
            exc = RuntimeUnavailable(f"the model server is unreachable: {type(err).__name__}")
            self._llm_record(svc, step, error={"code": exc.code.value, "message": exc.message})
            return _error_response(exc)
        if upstream.status_code != 200 or not stream:
            data = await upstream.aread()
            await upstream.aclose()
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = {"error": {"message": data[:500].decode("utf-8", "replace")}}
            if upstream.status_code == 200 and isinstance(parsed, dict):
                self._llm_record(svc, step, response=parsed)
            else:
                err_body = parsed.get("error") if isinstance(parsed, dict) else None
                self._llm_record(
                    svc, step, error={"status": upstream.status_code, "upstream": err_body}
                )
            return JSONResponse(parsed, status_code=upstream.status_code)

        async def relay() -> AsyncIterator[bytes]:
            chunks: list[dict[str, Any]] = []
            try:
                async for line in upstream.aiter_lines():
                    if line.startswith("data:"):
                        payload = line[5:].strip()
                        if payload and payload != "[DONE]":
                            with contextlib.suppress(ValueError):
                                chunks.append(json.loads(payload))
                    yield (line + "\n").encode()
            finally:
                await upstream.aclose()
                self._llm_record(svc, step, response=assemble_chunks(chunks))

        return StreamingResponse(relay(), media_type="text/event-stream")

    # ------------------------------------------------------------------ the trainer's side

    def _llm_wake(self) -> None:
        for fut in list(self._llm_waiters):
            if not fut.done():
                fut.set_result(None)

    def _llm_service(self, sandbox_id: str) -> _Service:
        self._llm_init()
        svc = self._llm_services.get(sandbox_id)
        if svc is None and sandbox_id not in getattr(self, "_boxes", {}):
            raise SandboxNotFound(f"no sandbox {sandbox_id!r} (its model calls ended with it)")
        if svc is None or svc.key not in self._llm_keys:
            raise NotFound(f"sandbox {sandbox_id!r} has no model service")
        return svc

    def _llm_touch(self, sandbox_id: str) -> None:
        """A trainer's poll is a use of the sandbox: it renews the lease like any call."""
        box = getattr(self, "_box", None)
        if box is not None:
            with contextlib.suppress(RockError):
                box(sandbox_id)

    def _llm_take(self, services: list[_Service], max_calls: int) -> list[LLMCall]:
        out: list[LLMCall] = []
        for svc in services:
            while svc.queue and len(out) < max_calls:
                out.append(svc.queue.popleft())
        return out

    async def _llm_wait(self, ids: list[str], wait: float, max_calls: int) -> list[LLMCall]:
        self._llm_init()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            services = [s for i in ids if (s := self._llm_services.get(i)) is not None]
            if not services:
                raise SandboxNotFound(f"no live sandbox with a model service among {ids[:3]!r}")
            calls = self._llm_take(services, max_calls)
            remaining = deadline - loop.time()
            if calls or remaining <= 0:
                return calls
            fut: asyncio.Future[None] = loop.create_future()
            self._llm_waiters.add(fut)
            try:
                await asyncio.wait_for(fut, remaining)
            except asyncio.TimeoutError:
                pass
            finally:
                self._llm_waiters.discard(fut)

    async def llm_poll(
        self, sandbox_id: str, wait: float = 20.0, max_calls: int = 256
    ) -> list[LLMCall]:
        """The sandbox's relayed calls not yet handed out; waits up to ``wait`` s for one.

        Raises:
            NotFound: the sandbox has no model service.
            SandboxNotFound: it is gone (its calls ended with it).
        """
        self._llm_service(sandbox_id)
        self._llm_touch(sandbox_id)
        return await self._llm_wait([sandbox_id], wait, max_calls)

    async def llm_poll_many(
        self, sandbox_ids: list[str], wait: float = 20.0, max_calls: int = 256
    ) -> list[LLMCall]:
        """:meth:`llm_poll` over several sandboxes of this Worker (one trainer connection);
        sandboxes that are gone are skipped while any one remains.
        """
        for sandbox_id in sandbox_ids:
            self._llm_touch(sandbox_id)
        return await self._llm_wait(sandbox_ids, wait, max_calls)

    async def llm_release(self, sandbox_id: str, call_ids: list[str]) -> int:
        """Hand calls that were polled but will not be answered back to the queue (a poll
        whose taker went away); returns how many still waited and were requeued.
        """
        svc = self._llm_service(sandbox_id)
        back = [
            svc.calls[c]
            for c in call_ids
            if c in svc.calls and c in svc.pending and svc.calls[c] not in svc.queue
        ]
        for call in sorted(back, key=lambda c: c.step, reverse=True):
            svc.queue.appendleft(call)
        if back:
            self._llm_wake()
        return len(back)

    async def llm_answer(self, sandbox_id: str, call_id: str, answer: LLMAnswer) -> None:
        """Answer a relayed call (a chat.completion object, or an error the agent sees).

        Raises:
            NotFound: no such call waits (answered, timed out, agent gone: the message says).
        """
        svc = self._llm_service(sandbox_id)
        self._llm_touch(sandbox_id)
        fut = svc.pending.get(call_id)
        if fut is None or fut.done():
            why = svc.ended.get(call_id)
            raise NotFound(
                f"call {call_id!r} is not waiting" + (f": {why}" if why else ""), call_id=call_id
            )
        svc.end(call_id, "it was answered")
        if answer.response is not None:
            fut.set_result(answer.response)
        else:
            fut.set_exception(_TrainerError(answer.error or "the trainer failed the call"))

    async def llm_trajectory(self, sandbox_id: str) -> Trajectory:
        """The sandbox's recorded model calls so far."""
        self._llm_init()
        svc = self._llm_services.get(sandbox_id)
        if svc is None:
            raise NotFound(f"sandbox {sandbox_id!r} has no model service")
        return Trajectory(
            trajectory_id=svc.trajectory_id, sandbox_id=sandbox_id, steps=list(svc.steps)
        )


class _Unauthorized(Exception):
    pass


class _TrainerError(InternalError):
    """The trainer failed the call (``call.fail(message)``): the agent gets a 500 api_error."""


async def _disconnect(request: Any) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _sse(chunks: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"
