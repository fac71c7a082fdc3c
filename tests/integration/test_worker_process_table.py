"""The Worker's process table (the console's "processes running" chart): a real Worker on the
local runtime, real background processes in its sandboxes, no Ray.
"""

from __future__ import annotations

import uuid

from rock_serve.config import ServerArgs
from rock_serve.deployments.worker import Worker
from rock_serve.protocol import CreateSandboxRequest
from rock_serve.protocol.processes import ProcessInputBody, ProcessStartRequest
from tests._wait import async_wait_until
from tests.contract.conftest import make_config


async def test_the_status_counts_running_processes_until_they_end(tmp_path) -> None:
    args = ServerArgs(runtime=make_config("local", str(tmp_path / "state")))  # type: ignore[arg-type]
    worker = Worker(args, "proc", "node-proc")
    await worker.ready()

    async def running() -> int:
        return (await worker.status()).processes_running

    try:
        a, b = (f"sb-proc-{uuid.uuid4().hex[:16]}" for _ in range(2))
        for sid in (a, b):
            await worker.create(sid, CreateSandboxRequest(), ttl=120)
        assert await running() == 0
        sleeper = await worker.start_process(a, ProcessStartRequest(command="sleep 600"))
        reader = await worker.start_process(a, ProcessStartRequest(command="cat", stdin=True))
        await worker.start_process(b, ProcessStartRequest(command="sleep 600"))
        assert await running() == 3  # counted from the start replies, at once
        # A process that ends on its own leaves the table at a later refresh.
        await worker.process_input(a, reader.pid, ProcessInputBody(data="", eof=True))
        await async_wait_until(lambda: _is(running, 2), what="cat to leave the table")
        await worker.kill_process(a, sleeper.pid)
        assert await running() == 1
        # Removing the sandbox ends its processes, and the table forgets it.
        await worker.remove(b)
        await async_wait_until(lambda: _is(running, 0), what="the removed sandbox to go")
    finally:
        await worker.shutdown()


async def _is(count, n: int) -> bool:
    return bool(await count() == n)
