"""rl-rock's own SDK timing the compat API (run by bench/compat.py in .clients/rl-rock).

Usage: python _rock_client.py URL N_STARTS N_ECHO GROUP; prints one JSON line of samples (s).
"""

import asyncio
import json
import sys
import time

from rock.actions import CreateBashSessionRequest
from rock.sdk.sandbox.client import Sandbox, SandboxGroup
from rock.sdk.sandbox.config import SandboxConfig, SandboxGroupConfig

URL, STARTS, ECHOES, GROUP = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
GROUP_RUNS = int(sys.argv[5]) if len(sys.argv) > 5 else 3


def config():
    return SandboxConfig(base_url=URL, auto_clear_seconds=600, memory="1g", cpus=1)


async def main():
    out = {"start": [], "echo": [], "group": []}
    for _ in range(STARTS):
        sb = Sandbox(config())
        t0 = time.perf_counter()
        await sb.start()
        out["start"].append(time.perf_counter() - t0)
        await sb.stop()
    sb = Sandbox(config())
    await sb.start()
    await sb.create_session(CreateBashSessionRequest(session="bench"))
    for i in range(ECHOES + 10):
        t0 = time.perf_counter()
        obs = await sb.arun("echo hi", session="bench")
        if i >= 10:  # warm-up excluded
            out["echo"].append(time.perf_counter() - t0)
        assert obs.output.strip() == "hi", obs
    await sb.stop()
    for _ in range(GROUP_RUNS):
        group = SandboxGroup(
            SandboxGroupConfig(**config().model_dump(), size=GROUP, start_concurrency=GROUP)
        )
        t0 = time.perf_counter()
        await group.start()
        out["group"].append(time.perf_counter() - t0)
        await group.stop()
    return out


print(json.dumps(asyncio.run(main())))
