"""The SDK's Ray transport against the session's platform, from this process (a Ray driver).

The same operations as the HTTP tests, through ``AsyncClient.from_ray``: actor calls to the
Scheduler and the Workers, no HTTP hop, the same typed errors. Latency of an in-session echo is
measured next to the same echo over HTTP and printed (``-s`` shows it).
"""

from __future__ import annotations

import asyncio

import pytest

from rock_serve.errors import (
    FileNotFound,
    InvalidRequest,
    RuntimeUnavailable,
    SandboxNotFound,
    SessionNotFound,
)
from rock_serve.protocol import OutputChunk, SandboxState, SessionRunResult
from rock_serve.sdk import AsyncClient, Client

pytestmark = pytest.mark.ray

NAMESPACE = "rock-e2e"


def test_ray_transport_sandbox_life_cycle(platform, api):
    async def scenario() -> str:
        client = AsyncClient.from_ray(namespace=NAMESPACE)
        assert (await client.health()).status == "ok"
        async with client, client.sandbox(ttl_seconds=300, labels={"via": "ray"}) as sb:
            assert sb.record.state == SandboxState.RUNNING
            assert (await client.get_sandbox(sb.id)).id == sb.id
            listed = await client.list_sandboxes(labels={"via": "ray"})
            assert [r.id for r in listed] == [sb.id]

            assert (await sb.run("mkdir -p w && cd w && X=41")).exit_code == 0
            result = await sb.run("echo $((X+1)) $(basename $PWD)")
            assert result.output == "42 w\n"
            items = [item async for item in sb.stream_run("echo a; echo b")]
            assert isinstance(items[-1], SessionRunResult)
            assert "".join(i.data for i in items if isinstance(i, OutputChunk)) == "a\nb\n"
            out = await sb.exec(["printf", "%s", "one-shot"])
            assert (out.exit_code, out.stdout) == (0, "one-shot")
            streamed = [item async for item in sb.stream_exec("echo streamed")]
            assert streamed[-1].exit_code == 0  # type: ignore[union-attr]

            small = await sb.files.write("d/small.txt", b"hello\n", mode=0o600)
            assert small.size == 6
            assert await sb.files.read("d/small.txt") == b"hello\n"
            assert (await sb.files.stat("d/small.txt")).size == 6
            big = bytes(range(256)) * (3 * 4096 + 1)  # ~3 MiB: goes as an object ref
            assert (await sb.files.write("d/big.bin", big)).size == len(big)
            assert await sb.files.read("d/big.bin") == big
            names = [e.name for e in (await sb.files.list("d")).entries]
            assert names == ["big.bin", "small.txt"]
            await sb.files.remove("d", recursive=True)

            # The same typed errors as over HTTP.
            with pytest.raises(FileNotFound):
                await sb.files.read("d/small.txt")
            with pytest.raises(SessionNotFound):
                await client.run(sb.id, "true", session="nope")
            with pytest.raises(SandboxNotFound):
                await client.get_sandbox("sb-nosuchworker-0123456789abcdef")
            with pytest.raises(SandboxNotFound):
                await client.run("not-an-id", "true")
            with pytest.raises(InvalidRequest):
                await client.create_sandbox(ttl_seconds=7200)  # over max_ttl_seconds
            await sb.files.write("d/arch.txt", b"tarred")
            tar = await client.download_archive(sb.id, "d")
            await client.upload_archive(sb.id, "copy", tar)
            assert await sb.files.read("copy/arch.txt") == b"tarred"
            sid = sb.id
        with pytest.raises(SandboxNotFound):
            await client.get_sandbox(sid)
        return sid

    sid = asyncio.run(scenario())
    assert api.get(f"/v1/sandboxes/{sid}").status_code == 404
    assert sid not in platform.runtime_ids()


def test_ray_transport_refuses_what_it_cannot_do(platform):
    with pytest.raises(RuntimeUnavailable):
        AsyncClient.from_ray(namespace="rock-e2e-nothing-here")
    with pytest.raises(RuntimeUnavailable):
        Client.from_ray(namespace="rock-e2e-nothing-here")


def test_sync_ray_transport_and_job_ownership(platform, api):
    import ray

    client = Client.from_ray(namespace=NAMESPACE)
    try:
        assert client.health().status == "ok"
        with client.sandbox(ttl_seconds=300, lease_seconds=30) as sb:
            assert sb.record.ray_job_id == ray.get_runtime_context().get_job_id()
            assert sb.run("X=5; cd /").exit_code == 0
            assert sb.run("echo $((X*2))").output == "10\n"
            items = list(sb.stream_exec("echo one; echo two"))
            assert items[-1].exit_code == 0  # type: ignore[union-attr]
            # A stream left early is closed (its Ray generator cancelled); the sandbox goes on.
            long = sb.stream_exec("echo first; sleep 5")
            assert next(long).data == "first\n"  # type: ignore[union-attr]
            long.close()  # type: ignore[attr-defined]
            # Background processes and their output stream, blocking in ray.get.
            p = sb.process.start("echo p1; echo p2 >&2")
            assert list(p.stdout) == ["p1"] and p.wait(timeout=60).exit_code == 0
            sb.files.write("f.bin", b"x" * (2 << 20))
            assert len(sb.files.read("f.bin")) == 2 << 20
            before = sb.record.lease_expires_at
            assert before is not None and sb.renew().lease_expires_at >= before
            with pytest.raises(SandboxNotFound):
                client.get_sandbox("sb-nosuchworker-00000000")
        assert api.get(f"/v1/sandboxes/{sb.id}").status_code == 404
    finally:
        client.close()


# The Ray-vs-HTTP echo latency is measured by bench/latency.py and bench/throughput.py, not here:
# a latency threshold in a functional test fails on a loaded machine and proves nothing.


def test_ray_transport_steps_a_group_in_one_actor_call_per_worker(platform, monkeypatch):
    from rock_serve.deployments.client import AsyncRayTransport, SyncRayTransport

    sends: list[str] = []
    for cls in (AsyncRayTransport, SyncRayTransport):
        original = cls.send

        def counted(self, c, *, stream=False, original=original):  # type: ignore[no-untyped-def]
            sends.append(c.path)
            return original(self, c, stream=stream)

        monkeypatch.setattr(cls, "send", counted)
    nowhere = "sb-nosuchworker-0123456789abcdef"

    async def scenario() -> None:
        client = AsyncClient.from_ray(namespace=NAMESPACE)
        async with client, client.sandbox(ttl_seconds=300) as a, client.sandbox() as b:
            await a.run("X=first")
            await b.run("X=second")
            sends.clear()
            results = await client.run_many(
                [(a.id, "echo $X"), (b.id, "echo $X; false"), (nowhere, "true"), ("bad", "true")]
            )
            assert sends == []  # no call of its own per command: the batch went as one
            first, second, missing, malformed = results
            assert isinstance(first, SessionRunResult) and isinstance(second, SessionRunResult)
            assert (first.output, second.output) == ("first\n", "second\n")
            assert (first.exit_code, second.exit_code) == (0, 1)
            assert isinstance(missing, SandboxNotFound) and isinstance(malformed, SandboxNotFound)
            (nope,) = await client.run_many([(a.id, "echo hi")], session="nope")
            assert isinstance(nope, SessionNotFound)

    asyncio.run(scenario())
    client = Client.from_ray(namespace=NAMESPACE)
    try:
        with client.sandbox(ttl_seconds=300) as a, client.sandbox(ttl_seconds=300) as b:
            a.run("Y=1")
            b.run("Y=2")
            sends.clear()
            results = client.run_many([(b.id, "echo $Y"), (a.id, "echo $Y"), (nowhere, "true")])
            assert sends == []
            assert [r.output for r in results[:2]] == ["2\n", "1\n"]  # type: ignore[union-attr]
            assert isinstance(results[2], SandboxNotFound)
    finally:
        client.close()
