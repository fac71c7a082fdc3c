"""The model service end to end (issue 15.3): an agent in a sandbox calls OPENAI_BASE_URL and
the test answers as the trainer, through the SDK over HTTP and over Ray.

The agent is a python3 + urllib script inside the sandbox (on bwrap with network none: its
only way out is the reverse tunnel); the real ``openai`` package calls the endpoint where the
local runtime puts it (the host's loopback: the sandbox side of the tunnel).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from rock_serve.errors import NotFound, SandboxNotFound
from rock_serve.sdk import AsyncClient, Client, LLMRelay, Sandbox
from tests._wait import wait_until

pytestmark = pytest.mark.ray

AGENT = r"""
import json, os, sys, urllib.request, urllib.error
base, key = os.environ["OPENAI_BASE_URL"], os.environ["OPENAI_API_KEY"]
for arg in sys.argv[1:]:
    body = {"model": "policy", "messages": [{"role": "user", "content": arg}]}
    if arg.startswith("stream:"):
        body["stream"] = True
    req = urllib.request.Request(
        base + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    print(json.dumps({"status": status, "body": text}), flush=True)
"""

TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "bash", "arguments": json.dumps({"command": "ls"})},
}


def completion(text: str, *, tools: bool = False) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tools:
        message["tool_calls"] = [TOOL_CALL]
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1,
        "model": "policy",
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if tools else "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_agent(sb: Any, *prompts: str) -> Future[list[dict[str, Any]]]:
    """Start the scripted agent in the sandbox (in a thread); its replies as parsed lines."""
    sb.files.write("agent.py", AGENT)

    def run() -> list[dict[str, Any]]:
        result = sb.exec(["python3", "agent.py", *prompts], timeout=300)
        assert result.exit_code == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    return ThreadPoolExecutor(1).submit(run)


def _sse_text(body: str) -> tuple[str, list[dict[str, Any]]]:
    chunks = [
        json.loads(line[6:])
        for line in body.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    assert body.rstrip().endswith("data: [DONE]")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    return text, chunks


@pytest.fixture
def client(platform: Any) -> Iterator[Client]:
    with Client(base_url=platform.url) as c:
        yield c


# --------------------------------------------------------------------------- relay over HTTP


def test_relay_over_http_with_network_none(bwrap_host_tools_platform: Any) -> None:
    """bwrap, network none: the agent's calls reach the trainer (sync SDK, HTTP) and back."""
    with (
        Client(base_url=bwrap_host_tools_platform.url) as client,
        client.sandbox(model_service={"mode": "relay"}, trajectory_id="traj-http") as sb,
    ):
        env = sb.exec("env").stdout
        assert "OPENAI_BASE_URL=http://127.0.0.1:8765/v1" in env
        key = next(line for line in env.splitlines() if line.startswith("OPENAI_API_KEY="))
        assert key.startswith("OPENAI_API_KEY=sk-rock-")
        agent = _run_agent(sb, "first", "stream:second")
        seen = []
        for call in sb.llm.calls(wait=5):
            seen.append(call.request["messages"][0]["content"])
            assert call.sandbox_id == sb.id
            call.respond(completion(f"answer {len(seen)}", tools=len(seen) == 1))
            if len(seen) == 2:
                break
        first, second = agent.result(timeout=120)
        assert seen == ["first", "stream:second"]
        assert first["status"] == 200
        body = json.loads(first["body"])
        assert body["choices"][0]["message"]["content"] == "answer 1"
        assert body["choices"][0]["message"]["tool_calls"] == [TOOL_CALL]
        assert second["status"] == 200
        text, _ = _sse_text(second["body"])
        assert text == "answer 2"
        steps = sb.llm.trajectory()
        assert [s["request"]["messages"][0]["content"] for s in steps] == seen
        assert steps[0]["response"]["choices"][0]["message"]["tool_calls"] == [TOOL_CALL]
        record = sb.llm.trajectory_record()
        assert record.trajectory_id == "traj-http"


def test_a_fork_child_gets_its_own_model_service(bwrap_platform: Any) -> None:
    """Forking a sandbox with a model service: the child's agent reaches the trainer through
    the child's own tunnel, key and trajectory (issue 16 on top of 15.3).
    """
    with (
        Client(base_url=bwrap_platform.url) as client,
        client.sandbox(model_service={"mode": "relay"}) as parent,
    ):
        parent_key = parent.exec("printenv OPENAI_API_KEY").stdout.strip()
        (child,) = parent.fork(1)
        try:
            child_key = child.exec("printenv OPENAI_API_KEY").stdout.strip()
            assert child_key.startswith("sk-rock-") and child_key != parent_key
            agent = _run_agent(child, "from the child")
            for call in child.llm.calls(wait=5):
                assert call.sandbox_id == child.id
                assert call.request["messages"][0]["content"] == "from the child"
                call.respond(completion("child answer"))
                break
            (reply,) = agent.result(timeout=120)
            assert reply["status"] == 200, reply
            assert json.loads(reply["body"])["choices"][0]["message"]["content"] == "child answer"
            assert [s["request"]["messages"][0]["content"] for s in child.llm.trajectory()] == [
                "from the child"
            ]
            assert parent.llm.trajectory() == []  # the parent's record is its own
        finally:
            child.delete()


def test_relay_over_ray_many_sandboxes_one_connection(bwrap_host_tools_platform: Any) -> None:
    """Three sandboxes' agents answered through one multiplexed relay over the Ray transport."""
    namespace = "rock-e2e-bwrap-host"
    http = Client(base_url=bwrap_host_tools_platform.url)
    sandboxes = [http.sandbox(model_service={"mode": "relay"}).__enter__() for _ in range(3)]
    try:
        agents = [_run_agent(sb, f"hello from {i}") for i, sb in enumerate(sandboxes)]

        async def trainer() -> list[str]:
            seen = []
            async with AsyncClient.from_ray(namespace=namespace) as ray_client:
                from rock_serve.sdk import AsyncLLMRelay

                relay = AsyncLLMRelay(ray_client, [sb.id for sb in sandboxes], wait=5)
                async for call in relay.calls():
                    seen.append(call.sandbox_id)
                    text = call.request["messages"][0]["content"].upper()
                    await call.respond(completion(text))
                    if len(seen) == 3:
                        break
            return seen

        seen = asyncio.run(trainer())
        assert sorted(seen) == sorted(sb.id for sb in sandboxes)
        for i, agent in enumerate(agents):
            (reply,) = agent.result(timeout=120)
            assert reply["status"] == 200
            content = json.loads(reply["body"])["choices"][0]["message"]["content"]
            assert content == f"HELLO FROM {i}"
    finally:
        for sb in sandboxes:
            sb.__exit__(None, None, None)
        http.close()


def test_sync_relay_over_ray(bwrap_host_tools_platform: Any) -> None:
    """The sync client over Ray (as a rollout worker's Ray task calls it) answers an agent.

    Its own test: with the three-sandbox relay above it overran one test's timeout at load 40.
    """
    with (
        Client(base_url=bwrap_host_tools_platform.url) as http,
        http.sandbox(model_service={"mode": "relay"}) as sb,
    ):
        agent = _run_agent(sb, "sync over ray")
        with Client.from_ray(namespace="rock-e2e-bwrap-host") as ray_client:
            for call in LLMRelay(ray_client, [sb.id], wait=5).calls():
                call.respond(completion(call.request["messages"][0]["content"][::-1]))
                break
            (reply,) = agent.result(timeout=120)
            # The trajectory over Ray is the one over HTTP (same route, other transport).
            over_ray = Sandbox(ray_client, sb.record, delete_on_exit=False, heartbeat=False)
            steps = over_ray.llm.trajectory()
        assert json.loads(reply["body"])["choices"][0]["message"]["content"] == "yar revo cnys"
        assert steps == sb.llm.trajectory()
        assert [s["response"]["choices"][0]["message"]["content"] for s in steps] == [
            "yar revo cnys"
        ]


# --------------------------------------------------------------------------- the openai package


def test_openai_package_streaming_and_tools_multiplexed_over_http(
    platform: Any, client: Client
) -> None:
    """The real openai client (sync) against the tunnel's sandbox end; the trainer multiplexes
    two sandboxes over one HTTP long poll (LLMRelay)."""
    openai = pytest.importorskip("openai")
    ports = [_free_port(), _free_port()]
    with (
        client.sandbox(model_service={"mode": "relay", "port": ports[0]}) as a,
        client.sandbox(model_service={"mode": "relay", "port": ports[1]}) as b,
    ):
        keys = [sb.exec("printf %s $OPENAI_API_KEY").stdout for sb in (a, b)]

        def agent(port: int, key: str) -> tuple[Any, str]:
            oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
            tools = [
                {
                    "type": "function",
                    "function": {
                        "name": "bash",
                        "parameters": {
                            "type": "object",
                            "properties": {"command": {"type": "string"}},
                        },
                    },
                }
            ]
            msg = [{"role": "user", "content": "go"}]
            plain = oai.chat.completions.create(model="policy", messages=msg, tools=tools)
            stream = oai.chat.completions.create(model="policy", messages=msg, stream=True)
            return plain, "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(agent, p, k) for p, k in zip(ports, keys, strict=True)]
            answered = 0
            for call in LLMRelay(client, [a.id, b.id], wait=5).calls():
                assert call.request["model"] == "policy"
                tools = not call.request.get("stream")
                call.respond(completion(f"from {call.sandbox_id}", tools=tools))
                answered += 1
                if answered == 4:
                    break
            for sb, fut in zip((a, b), futures, strict=True):
                plain, streamed = fut.result(timeout=120)
                assert plain.choices[0].message.content == f"from {sb.id}"
                assert plain.choices[0].message.tool_calls[0].function.name == "bash"
                assert streamed == f"from {sb.id}"


# --------------------------------------------------------------------------- bad input, leaks


def test_trainer_never_answers_typed_timeout_nothing_left(platform: Any, client: Client) -> None:
    port = _free_port()
    with client.sandbox(model_service={"mode": "relay", "port": port, "timeout": 1}) as sb:
        agent = _run_agent(sb, "anyone?")
        (reply,) = agent.result(timeout=120)
        assert reply["status"] == 504
        error = json.loads(reply["body"])["error"]
        assert error["code"] == "llm_timeout"
        assert error["type"] == "timeout"
        assert sb.llm.poll(wait=0) == []  # the timed-out call is not handed out any more
        (step,) = sb.llm.trajectory()
        assert step["error"]["code"] == "llm_timeout"
        # The call's id from the trajectory is gone: answering it is a typed 404.
        resp = httpx.post(
            f"{platform.url}/v1/sandboxes/{sb.id}/llm/calls/{sb.id}.999999",
            json={"response": completion("late")},
        )
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "not_found"


def test_a_failed_call_reaches_the_agent_openai_style(client: Client) -> None:
    """``call.fail(message)``: the agent gets a 500 with the message; the trajectory says so."""
    with client.sandbox(model_service={"mode": "relay", "port": _free_port()}) as sb:
        agent = _run_agent(sb, "fail me")
        call = next(iter(sb.llm.calls(wait=5)))
        call.fail("the trainer gave up")
        (reply,) = agent.result(timeout=120)
        assert reply["status"] == 500
        assert "the trainer gave up" in json.loads(reply["body"])["error"]["message"]
        (step,) = sb.llm.trajectory()
        assert "response" not in step and step["error"]


def test_late_answer_after_agent_disconnect_is_not_found(platform: Any, client: Client) -> None:
    port = _free_port()
    with client.sandbox(model_service={"mode": "relay", "port": port}) as sb:
        key = sb.exec("printf %s $OPENAI_API_KEY").stdout
        with socket.create_connection(("127.0.0.1", port)) as raw:
            body = json.dumps({"messages": [{"role": "user", "content": "bye"}]}).encode()
            raw.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                + f"\r\nAuthorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            call = next(iter(sb.llm.calls(wait=5)))
        # The agent hung up: its call is cancelled and the trajectory says so.
        wait_until(lambda: sb.llm.trajectory()[0].get("error") is not None, what="cancel")
        assert sb.llm.trajectory()[0]["error"]["code"] == "cancelled"
        with pytest.raises(NotFound, match="disconnected"):
            call.respond(completion("too late"))


def test_delete_ends_pending_calls_and_the_trainer_loop(platform: Any, client: Client) -> None:
    port = _free_port()
    sb = client.sandbox(model_service={"mode": "relay", "port": port}).__enter__()
    agent = _run_agent(sb, "pending")
    call = next(iter(sb.llm.calls(wait=5)))
    done = threading.Event()
    ended: list[int] = []

    def trainer() -> None:
        ended.append(sum(1 for _ in sb.llm.calls(wait=2)))
        done.set()

    threading.Thread(target=trainer, daemon=True).start()
    sb.delete()
    assert done.wait(60)
    assert ended == [0]  # the loop ended with the sandbox
    with pytest.raises(SandboxNotFound):
        call.respond(completion("late"))
    with pytest.raises(Exception):  # noqa: B017 - the sandbox (and its agent) is gone
        agent.result(timeout=60)


def test_bad_requests_get_openai_style_errors(platform: Any, client: Client) -> None:
    port = _free_port()
    with client.sandbox(model_service={"mode": "relay", "port": port}) as sb:
        key = sb.exec("printf %s $OPENAI_API_KEY").stdout
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        resp = httpx.post(url, json={"messages": []}, headers={"authorization": "Bearer nope"})
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "authentication_error"
        resp = httpx.post(url, content=b"{", headers={"authorization": f"Bearer {key}"})
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "invalid_request"
    bad = client._http.post("/v1/sandboxes", json={"model_service": {"mode": "proxy"}})
    assert bad.status_code == 422 or bad.json()["error"]["code"] == "invalid_request"


# --------------------------------------------------------------------------- proxy and replay


@pytest.fixture
def model_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A small real OpenAI-compatible server on loopback (needs its own key)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    seen: list[dict[str, Any]] = []

    async def chat(request: Request) -> Response:
        if request.headers.get("authorization") != "Bearer upstream-secret-key":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        body = await request.json()
        seen.append(body)
        answer = completion("echo: " + body["messages"][-1]["content"])
        answer["model"] = body["model"]
        if not body.get("stream"):
            return JSONResponse(answer)

        async def sse() -> Any:
            for word in ("echo: ", body["messages"][-1]["content"]):
                chunk = {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": body["model"],
                    "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
                }
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, what="the model server")
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", seen
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_proxy_keeps_the_key_on_the_node_then_replay(
    platform: Any, client: Client, model_server: tuple[str, list[dict[str, Any]]]
) -> None:
    base_url, seen = model_server
    spec = {
        "mode": "proxy",
        "port": _free_port(),
        "base_url": base_url,
        "api_key": "upstream-secret-key",
        "model": "served-model",
    }
    with client.sandbox(model_service=spec, trajectory_id="traj-proxy") as sb:
        first, second = _run_agent(sb, "one", "stream:two").result(timeout=120)
        assert json.loads(first["body"])["choices"][0]["message"]["content"] == "echo: one"
        assert _sse_text(second["body"])[0] == "echo: stream:two"
        assert [b["model"] for b in seen] == ["served-model", "served-model"]
        # The upstream key is nowhere in the sandbox: not in its env, not in any process's.
        found = sb.exec(
            "env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; "
            "grep -rl upstream-secret-key . 2>/dev/null; true"
        )
        assert "upstream-secret-key" not in found.stdout
        steps = sb.llm.trajectory()
        assert steps[1]["response"]["choices"][0]["message"]["content"] == "echo: stream:two"
    # Replay: the same requests get the recorded answers, with no model server involved.
    seen.clear()
    replay = {"mode": "replay", "port": _free_port(), "replay_trajectory_id": "traj-proxy"}
    with client.sandbox(model_service=replay) as sb:
        first, second = _run_agent(sb, "one", "stream:two").result(timeout=120)
        assert json.loads(first["body"])["choices"][0]["message"]["content"] == "echo: one"
        assert _sse_text(second["body"])[0] == "echo: stream:two"
        assert seen == []
    # A run that asks something else diverges at that step, typed.
    replay["port"] = _free_port()
    with client.sandbox(model_service=replay) as sb:
        first, second = _run_agent(sb, "one", "something else").result(timeout=120)
        assert first["status"] == 200
        assert second["status"] == 409
        error = json.loads(second["body"])["error"]
        assert error["code"] == "replay_diverged"
        assert error["step"] == 1


def test_inline_replay_and_reverse_ports(platform: Any, client: Client) -> None:
    """replay from steps given at create; a generic reverse port to a node-side TCP echo."""
    request = {"model": "policy", "messages": [{"role": "user", "content": "hi"}]}
    steps = [{"request": request, "response": completion("yo")}]
    echo = socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen()

    def serve() -> None:
        conn, _ = echo.accept()
        with conn:
            conn.sendall(conn.recv(100).upper())

    threading.Thread(target=serve, daemon=True).start()
    inner = _free_port()
    with client.sandbox(
        model_service={"mode": "replay", "port": _free_port(), "replay": steps},
        reverse_ports=[{"port": inner, "target": f"127.0.0.1:{echo.getsockname()[1]}"}],
    ) as sb:
        (reply,) = _run_agent(sb, "hi").result(timeout=120)
        assert json.loads(reply["body"])["choices"][0]["message"]["content"] == "yo"
        out = sb.exec(
            [
                "python3",
                "-c",
                f"import socket;s=socket.create_connection(('127.0.0.1',{inner}));"
                "s.sendall(b'ping');print(s.recv(100).decode())",
            ]
        )
        assert out.stdout.strip() == "PING"
    echo.close()


# --------------------------------------------------------------------------- SkyRL


def test_skyrl_gym_env_whose_step_is_one_relayed_call(platform: Any) -> None:
    """The relay call sequence of docs/model-service.md as a skyrl_gym text env, made through
    skyrl_gym.register/make and driven as SkyRL's generator drives it (init, step..., close).
    """
    skyrl_gym = pytest.importorskip("skyrl_gym")
    from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput

    class RelayEnv(BaseTextEnv):  # type: ignore[misc]
        def __init__(self, env_config: Any = None, extras: Any = None) -> None:
            super().__init__()
            self.client = Client(base_url=env_config["base_url"])
            self.extras = extras or {}

        def _next(self) -> Any:
            while not self.agent.done():  # the next call of the agent, or its exit
                for call in self.sb.llm.poll(wait=0.5):
                    return call
            return None

        def init(self, prompt: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
            spec = {"mode": "relay", "port": _free_port()}
            self.sb = self.client.sandbox(model_service=spec).__enter__()
            self.agent = _run_agent(self.sb, *self.extras["questions"])
            self.call = self._next()
            return self.call.request["messages"], {"sandbox_id": self.sb.id}

        def step(self, action: str) -> Any:
            self.call.respond(completion(action))
            self.call = self._next()
            if self.call is None:  # the agent is done: reward from what it got
                got = [json.loads(r["body"]) for r in self.agent.result(timeout=60)]
                texts = [g["choices"][0]["message"]["content"] for g in got]
                reward = float(texts == self.extras["expected"])
                return BaseTextEnvStepOutput(observations=[], reward=reward, done=True, metadata={})
            new = self.call.request["messages"][-1:]
            return BaseTextEnvStepOutput(observations=new, reward=0.0, done=False, metadata={})

        def close(self) -> None:
            self.sb.__exit__(None, None, None)
            self.client.close()

    skyrl_gym.register("rock-llm-relay-test", entry_point=RelayEnv)
    extras = {"questions": ["2+2?", "3+3?"], "expected": ["4", "6"]}
    env = skyrl_gym.make(
        "rock-llm-relay-test", env_config={"base_url": platform.url}, extras=extras
    )
    policy = {"2+2?": "4", "3+3?": "6"}
    with ThreadPoolExecutor(4) as pool:  # SkyRL calls init/step/close from a thread pool
        messages, meta = pool.submit(env.init, []).result()
        rewards = []
        while True:
            out = pool.submit(env.step, policy[messages[-1]["content"]]).result()
            rewards.append(out["reward"])
            if out["done"]:
                break
            messages = out["observations"]
        pool.submit(env.close).result()
    assert rewards == [0.0, 1.0]
    assert meta["sandbox_id"].startswith("sb-")
