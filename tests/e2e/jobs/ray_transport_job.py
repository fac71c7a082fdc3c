"""A Ray job that uses the SDK's Ray transport; `test_ray_job.py` submits it with `ray job submit`.

Usage: python ray_transport_job.py NAMESPACE. Prints one line ``RESULT <json>`` with what it saw
and the in-session echo latency (ms).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import ray

from rock_serve.errors import SandboxNotFound
from rock_serve.sdk import AsyncClient

N = 200


async def main(namespace: str) -> dict[str, object]:
    client = AsyncClient.from_ray(namespace=namespace)
    out: dict[str, object] = {}
    async with client.sandbox(ttl_seconds=300, owner="ray-job") as sb:
        out["sandbox"] = sb.id
        out["worker"] = sb.record.worker
        out["echo"] = (await sb.run("X=ray; echo via-$X")).output
        out["session_env"] = (await sb.run("echo $X")).output
        await sb.files.write("job/data.txt", b"from the job\n")
        out["read"] = (await sb.files.read("job/data.txt")).decode()
        big = b"\x00\xffbig" * (512 * 1024)  # 2.5 MiB through the object store
        await sb.files.write("job/big.bin", big)
        out["big_ok"] = await sb.files.read("job/big.bin") == big
        for _ in range(20):
            await sb.run("echo hi")
        samples = []
        for _ in range(N):
            t0 = time.perf_counter()
            await sb.run("echo hi")
            samples.append((time.perf_counter() - t0) * 1000)
        samples.sort()
        out["echo_p50_ms"] = samples[N // 2]
        out["echo_p99_ms"] = samples[int(N * 0.99)]
    try:
        await client.get_sandbox(str(out["sandbox"]))
        out["deleted"] = False
    except SandboxNotFound:
        out["deleted"] = True
    return out


if __name__ == "__main__":
    ray.init()  # inside `ray job submit`, RAY_ADDRESS names the job's cluster
    result = asyncio.run(main(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)
