"""rl-rock's own Sandbox / SandboxGroup against the platform (run in .clients/rl-rock).

Usage: python rock_sdk.py URL TOKEN MODE; prints one JSON line of what the SDK returned.
"""

import asyncio
import json
import os
import sys
import tempfile
import time

from rock.actions import Command, CreateBashSessionRequest, ReadFileRequest
from rock.actions.sandbox.request import CloseBashSessionRequest
from rock.sdk.sandbox.client import Sandbox, SandboxGroup
from rock.sdk.sandbox.config import SandboxConfig, SandboxGroupConfig

URL, TOKEN, MODE = sys.argv[1], sys.argv[2], sys.argv[3]


def config(**kw):
    headers = {"XRL-Authorization": f"Bearer {TOKEN}"} if TOKEN != "-" else {}
    return SandboxConfig(
        base_url=URL,
        extra_headers=headers,
        auto_clear_seconds=120,
        memory="1g",
        cpus=1,
        user_id="driver",
        experiment_id="exp-1",
        **kw,
    )


async def sandbox_flow():
    out = {}
    sb = Sandbox(config())
    t0 = time.perf_counter()
    await sb.start()
    out["start_seconds"] = time.perf_counter() - t0
    out["sandbox_id"] = sb.sandbox_id
    status = await sb.get_status()
    out["status"] = status.model_dump(mode="json")
    out["is_alive"] = bool(await sb.is_alive())
    out["echo"] = (await sb.arun("echo hello-$((40+2))")).model_dump()
    await sb.create_session(
        CreateBashSessionRequest(session="work", env={"A": "1"}, env_enable=True)
    )
    await sb.arun("cd /; export B=2", session="work")
    out["session"] = (await sb.arun('echo "$PWD $A $B"', session="work")).model_dump()
    try:
        await sb.arun("echo before; (exit 3)", session="work")
        out["failed_raise"] = None
    except Exception as exc:  # ROCK's check="raise": a non-zero exit is an exception
        out["failed_raise"] = str(exc)
    t0 = time.perf_counter()
    nohup = await sb.arun("sh -c 'sleep 2; echo nohup-done'", mode="nohup", wait_interval=5)
    out["nohup"] = nohup.model_dump()
    out["nohup_seconds"] = time.perf_counter() - t0
    res = await sb.execute(Command(command=["sh", "-c", "echo out; echo err >&2; exit 3"]))
    out["execute"] = res.model_dump()
    res = await sb.execute(Command(command="echo $((6*7))"))
    out["execute_str"] = res.model_dump()
    out["write"] = (await sb.write_file_by_path("line1\nline2\n", "data/notes.txt")).model_dump()
    out["read"] = (await sb.read_file(ReadFileRequest(path="data/notes.txt"))).model_dump()
    with tempfile.NamedTemporaryFile("wb", suffix=".bin", delete=False) as f:
        f.write(bytes(range(256)) * 10)
    out["upload"] = (await sb.upload_by_path(f.name, "data/blob.bin")).model_dump()
    os.unlink(f.name)
    out["uploaded_size"] = (await sb.arun("wc -c < data/blob.bin")).output.strip()
    out["close_session"] = (
        await sb.close_session(CloseBashSessionRequest(session="work"))
    ).model_dump()
    await sb.stop()
    try:
        await sb.get_status()
        out["after_stop"] = None
    except Exception as exc:
        out["after_stop"] = str(exc)
    return out


async def group_flow(size):
    group = SandboxGroup(
        SandboxGroupConfig(**config().model_dump(), size=size, start_concurrency=size)
    )
    t0 = time.perf_counter()
    await group.start()
    seconds = time.perf_counter() - t0
    outs = await asyncio.gather(
        *(sb.arun(f"echo member-{i}") for i, sb in enumerate(group.sandbox_list))
    )
    ids = [sb.sandbox_id for sb in group.sandbox_list]
    await group.stop()
    return {"ids": ids, "outputs": [o.output for o in outs], "start_seconds": seconds}


async def unauthorized():
    sb = Sandbox(config())
    try:
        await sb.start()
        return {"started": sb.sandbox_id}
    except Exception as exc:
        return {"error": str(exc)}


if MODE == "sandbox":
    result = asyncio.run(sandbox_flow())
elif MODE.startswith("group"):
    result = asyncio.run(group_flow(int(MODE[len("group") :] or 3)))
elif MODE == "unauthorized":
    result = asyncio.run(unauthorized())
else:
    raise SystemExit(f"unknown mode {MODE}")
print(json.dumps(result))
