"""Benchmark: the model service's relay round trip beside a direct loopback HTTP floor.

Usage: ``.venv/bin/python bench/llm.py [--n 200] [--per-sandbox 10] [--many 64]``

Starts Ray + Serve with the rock-serve app on the local runtime (its sandboxes' tunnel ends are
on this host's loopback), creates sandboxes with ``model_service={"mode": "relay"}`` and
measures one agent request -> trainer -> agent response: the agent is an ``httpx.AsyncClient``
posting a chat.completions body to the sandbox's port (through the rocklet's reverse tunnel to
the Worker's HTTP server), the trainer answers every call from :class:`AsyncLLMRelay`
(HTTP: one long poll for all sandboxes; Ray: ``AsyncClient.from_ray``). The floor, in the same
run: the same client posting the same body to a loopback uvicorn server that answers at once.

Cases: 1 sandbox x ``--n`` sequential calls; ``--many`` sandboxes x ``--per-sandbox`` calls, all
agents at once. Prints p50/p99 in ms and the ratio of each p50 to the floor's. Never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import threading
import time
from typing import Any

import _harness as harness
import httpx

BODY = {"model": "policy", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1,
    "model": "policy",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ],
}


def _floor_server() -> tuple[str, Any]:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse(ANSWER)

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1", server


async def _agent(http: httpx.AsyncClient, base: str, key: str, n: int, out: list[float]) -> None:
    headers = {"authorization": f"Bearer {key}"}
    for _ in range(n):
        t = time.perf_counter()
        resp = await http.post(f"{base}/chat/completions", json=BODY, headers=headers)
        out.append((time.perf_counter() - t) * 1000)
        assert resp.status_code == 200, resp.text


async def _trainer(client: Any, ids: list[str], stop: asyncio.Event) -> None:
    from rock_serve.sdk import AsyncLLMRelay

    relay = AsyncLLMRelay(client, ids, wait=1.0)
    pending: set[asyncio.Task[None]] = set()
    calls = relay.calls()
    try:
        async for call in calls:
            task = asyncio.ensure_future(call.respond(ANSWER))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if stop.is_set():
                break
    finally:
        await calls.aclose()  # type: ignore[attr-defined]
        await asyncio.gather(*pending, return_exceptions=True)


async def _case(
    url: str,
    namespace: str,
    sandboxes: list[tuple[str, str, str]],
    per: int,
    transport: str,
) -> list[float]:
    from rock_serve.sdk import AsyncClient

    client = AsyncClient(url) if transport == "http" else AsyncClient.from_ray(namespace=namespace)
    stop = asyncio.Event()
    trainer = asyncio.ensure_future(_trainer(client, [s[0] for s in sandboxes], stop))
    samples: list[float] = []
    limits = httpx.Limits(max_connections=len(sandboxes) + 8)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(_agent(http, base, key, 3, []) for _, base, key in sandboxes))
        await asyncio.gather(*(_agent(http, base, key, per, samples) for _, base, key in sandboxes))
    stop.set()
    trainer.cancel()
    await asyncio.gather(trainer, return_exceptions=True)
    await client.aclose()
    return samples


async def _floor(base: str, agents: int, per: int) -> list[float]:
    samples: list[float] = []
    limits = httpx.Limits(max_connections=agents + 8)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*(_agent(http, base, "x", 3, []) for _ in range(agents)))
        await asyncio.gather(*(_agent(http, base, "x", per, samples) for _ in range(agents)))
    return samples


async def _make(url: str, count: int) -> list[tuple[str, str, str]]:
    from rock_serve.sdk import AsyncClient

    out = []
    async with AsyncClient(url) as client:
        for _ in range(count):
            port = harness.free_port()
            record = await client.create_sandbox(
                ttl_seconds=1800, model_service={"mode": "relay", "port": port}
            )
            result = await client.exec(record.id, "printf %s $OPENAI_API_KEY")
            out.append((record.id, f"http://127.0.0.1:{port}/v1", result.stdout))
    return out


def _row(name: str, samples: list[float], floor: float) -> str:
    p50, p99 = harness.pct(samples, 50), harness.pct(samples, 99)
    return f"| {name} | {len(samples)} | {p50:.2f} | {p99:.2f} | {p50 / floor:.1f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200, help="Calls in the 1-sandbox case.")
    parser.add_argument("--many", type=int, default=64, help="Sandboxes in the fan-in case.")
    parser.add_argument("--per-sandbox", type=int, default=10, help="Calls per sandbox there.")
    opts = parser.parse_args()
    namespace = "rock-bench-llm"
    floor_base, floor_server = _floor_server()
    args = {"runtime": "local", "namespace": namespace, "max_sandboxes_per_node": opts.many + 4}
    rows = []
    with harness.platform({"/": args}) as urls:
        url = urls["/"]
        one = asyncio.run(_make(url, 1))
        many = asyncio.run(_make(url, opts.many))
        f1 = asyncio.run(_floor(floor_base, 1, opts.n))
        fm = asyncio.run(_floor(floor_base, opts.many, opts.per_sandbox))
        floor1, floorm = harness.pct(f1, 50), harness.pct(fm, 50)
        rows.append(_row("floor: direct loopback HTTP, 1 agent", f1, floor1))
        for transport in ("http", "ray"):
            s = asyncio.run(_case(url, namespace, one, opts.n, transport))
            rows.append(_row(f"relay over {transport}, 1 sandbox", s, floor1))
        rows.append(_row(f"floor: direct loopback HTTP, {opts.many} agents", fm, floorm))
        for transport in ("http", "ray"):
            s = asyncio.run(_case(url, namespace, many, opts.per_sandbox, transport))
            rows.append(_row(f"relay over {transport}, {opts.many} sandboxes", s, floorm))
    floor_server.should_exit = True
    print("| case | calls | p50 ms | p99 ms | p50 / floor |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
