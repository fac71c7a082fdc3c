"""SWE-ReX's own RemoteRuntime against one platform sandbox (run in .clients/swe-rex).

Usage: python swerex_remote.py BASE_URL TOKEN; BASE_URL is .../v1/sandboxes/<id>/swerex.
Prints one JSON line."""

import asyncio
import json
import pathlib
import sys
import tempfile

from swerex.exceptions import CommandTimeoutError, NonZeroExitCodeError, SessionDoesNotExistError
from swerex.runtime.abstract import (
    BashAction,
    CloseBashSessionRequest,
    Command,
    CreateBashSessionRequest,
    ReadFileRequest,
    UploadRequest,
    WriteFileRequest,
)
from swerex.runtime.config import RemoteRuntimeConfig
from swerex.runtime.remote import RemoteRuntime

BASE, TOKEN = sys.argv[1], sys.argv[2]


async def main():
    runtime = RemoteRuntime.from_config(
        RemoteRuntimeConfig(host=BASE, port=None, auth_token=TOKEN, timeout=30)
    )
    out = {"is_alive": (await runtime.is_alive()).is_alive}
    if not out["is_alive"]:
        out["message"] = (await runtime.is_alive()).message
        return out
    await runtime.create_session(CreateBashSessionRequest())
    obs = await runtime.run_in_session(BashAction(command="cd /tmp && export X=7", check="raise"))
    obs = await runtime.run_in_session(BashAction(command='echo "$PWD $X"', check="raise"))
    out["session"] = obs.output
    try:
        await runtime.run_in_session(BashAction(command="(exit 5)", check="raise"))
        out["nonzero"] = None
    except NonZeroExitCodeError as exc:
        out["nonzero"] = str(exc)
    try:
        await runtime.run_in_session(BashAction(command="sleep 5", timeout=0.5, check="raise"))
        out["timeout"] = None
    except CommandTimeoutError as exc:
        out["timeout"] = type(exc).__name__
    try:
        await runtime.run_in_session(BashAction(command="true", session="nope"))
        out["no_session"] = None
    except SessionDoesNotExistError as exc:
        out["no_session"] = type(exc).__name__
    res = await runtime.execute(Command(command=["sh", "-c", "echo out; echo err >&2; exit 2"]))
    out["execute"] = res.model_dump()
    await runtime.write_file(WriteFileRequest(path="swx/notes.txt", content="a\nb\n"))
    out["read"] = (await runtime.read_file(ReadFileRequest(path="swx/notes.txt"))).content
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "pkg"
        (src / "sub").mkdir(parents=True)
        (src / "sub" / "mod.py").write_text("VALUE = 42\n")
        await runtime.upload(UploadRequest(source_path=str(src), target_path="uploaded"))
    out["uploaded"] = (await runtime.read_file(ReadFileRequest(path="uploaded/sub/mod.py"))).content
    await runtime.close_session(CloseBashSessionRequest())
    await runtime.close()
    return out


print(json.dumps(asyncio.run(main())))
