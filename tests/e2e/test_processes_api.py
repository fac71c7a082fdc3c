"""Background processes through the platform (Ray Serve, local runtime): REST, both SDK twins,
the CLI and the Ray transport; typed errors for bad input; a deleted sandbox ends them.

The ops themselves (floods, signals, stdin, caps) are covered against a bare rocklet in
``tests/integration/test_rocklet_processes.py``; this checks the layers above it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rock_serve.errors import Conflict, ProcessNotFound, Timeout
from rock_serve.protocol.processes import ProcessOutputEnd, ProcessTruncated
from rock_serve.sdk import AsyncClient, Client
from tests._wait import async_wait_until, wait_until

pytestmark = pytest.mark.ray

NAMESPACE = "rock-e2e"


def _ndjson(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def test_processes_over_rest_sdk_and_cli(platform, api):
    with Client(platform.url) as client, client.sandbox(ttl_seconds=300) as sb:
        base = f"/v1/sandboxes/{sb.id}/processes"
        # REST: start, follow the output as NDJSON, status, list.
        resp = api.post(base, json={"command": "echo one; echo two >&2; exit 4"})
        assert resp.status_code == 201, resp.text
        pid = resp.json()["pid"]
        lines = _ndjson(api.get(f"{base}/{pid}/output", params={"follow": "true"}).text)
        assert lines[-1]["type"] == "end" and lines[-1]["process"]["exit_code"] == 4
        assert [(x["offset"], x["data"]) for x in lines if x["type"] == "data"] == [(0, "one\n")]
        err = _ndjson(api.get(f"{base}/{pid}/output", params={"stream": "stderr"}).text)
        assert err[0]["data"] == "two\n" and err[-1]["next"] == 4
        assert api.get(f"{base}/{pid}").json()["running"] is False
        assert [p["pid"] for p in api.get(base).json()["processes"]] == [pid]
        # A flood keeps only the newest bytes: the reader from 0 gets a typed marker first.
        flood = api.post(
            base,
            json={"command": "head -c 300000 /dev/zero | tr '\\0' x", "max_output_bytes": 1000},
        ).json()["pid"]
        assert api.post(f"{base}/{flood}/wait", params={"timeout": 60}).json()["exit_code"] == 0
        items = _ndjson(api.get(f"{base}/{flood}/output").text)
        assert items[0] == {"type": "truncated", "stream": "stdout", "truncated_before": 299000}
        assert items[1]["offset"] == 299000 and len(items[1]["data"]) == 1000
        # Bad input: typed errors with the table's statuses.
        bad = [
            (api.get(f"{base}/999999"), 404, "process_not_found"),
            (api.get(f"{base}/{pid}/output", params={"stream": "x"}), 400, "invalid_request"),
            (api.get(f"{base}/{pid}/output", params={"offset": -1}), 400, "invalid_request"),
            (api.post(f"{base}/{pid}/signal", json={"signal": "TERM"}), 409, "conflict"),
            (api.post(base, json={"command": ""}), 400, "invalid_request"),
            (api.post(base, json={"command": ["/no/such/bin"]}), 404, "file_not_found"),
            (api.post(base, json={"command": ["a\u0000b"]}), 400, "invalid_request"),
            (api.post(f"{base}/{pid}/signal", json={"signal": "NOPE"}), 400, "invalid_request"),
            (
                api.post(f"{base}/{pid}/input", json={"data_base64": "%"}),
                400,
                "invalid_request",
            ),
            (api.post(f"{base}/{pid}/wait", params={"timeout": 1e9}), 400, "invalid_request"),
            (api.get("/v1/sandboxes/sb-nope-1/processes"), 404, "sandbox_not_found"),
        ]
        for response, status, code in bad:
            assert (response.status_code, response.json()["error"]["code"]) == (status, code)
        sleeper = api.post(base, json={"command": ["sleep", "1000"]}).json()["pid"]
        timed_out = api.post(f"{base}/{sleeper}/wait", params={"timeout": 0.1})
        assert (timed_out.status_code, timed_out.json()["error"]["code"]) == (504, "timeout")
        assert api.delete(f"{base}/{sleeper}").json()["signal"] == 9

        # The sync SDK: start with stdin, send input, iterate lines, wait.
        p = sb.process.start("read a; echo got:$a; echo done", stdin=True)
        p.send_input("hi\n")
        assert list(p.stdout) == ["got:hi", "done"]
        assert p.wait(timeout=60).exit_code == 0 and p.exit_code == 0
        with pytest.raises(Conflict):
            p.send_input("late")
        assert {q.pid for q in sb.process.list()} == {pid, flood, sleeper, p.pid}
        with pytest.raises(ProcessNotFound):
            sb.process.get(999999)
        long = sb.process.start(["sleep", "1000"])
        with pytest.raises(Timeout):
            long.wait(timeout=0.2)
        assert long.kill().signal == 9

        # The CLI: start, logs -f, wait (exit code), ls.
        started = _rock(platform, "sandbox", "process", "start", sb.id, "echo cli-out; exit 3")
        cli_pid = started.stdout.strip()
        logs = _rock(platform, "sandbox", "process", "logs", "-f", sb.id, cli_pid)
        assert logs.stdout == "cli-out\n"
        waited = _rock(platform, "sandbox", "process", "wait", sb.id, cli_pid, check=False)
        assert waited.returncode == 3, waited.stderr
        missing = _rock(platform, "sandbox", "process", "kill", sb.id, "999999", check=False)
        assert missing.returncode == 1 and "process_not_found" in missing.stderr


def _rock(platform, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ROCK_BASE_URL": platform.url, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "rock_serve.sdk.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


async def test_async_sdk_resumes_output_and_a_deleted_sandbox_ends_its_processes(platform, api):
    async with AsyncClient(platform.url) as client:
        async with client.sandbox(ttl_seconds=300) as sb:
            gate = "gate-file"
            p = await sb.process.start(
                f"echo first; while [ ! -e {gate} ]; do sleep 0.01; done; echo second"
            )
            async for line in p.stdout:  # a reader that stops, like a client that went away
                assert line == "first"
                break
            assert p.stdout.offset == 6 and (await p.status()).running
            await sb.files.write(gate, b"")
            assert [line async for line in p.stdout] == ["second"], "resumed from its offset"
            assert (await p.wait()).exit_code == 0
            assert await p.stderr.read() == b""
            # It outlives the request that started it; the sandbox's deletion ends it.
            sleeper = await sb.process.start("sleep 1000 & sleep 1000; wait")
            children = await async_wait_until(
                lambda: (
                    Path(f"/proc/{sleeper.pid}/task/{sleeper.pid}/children").read_text().split()
                ),
                what="the sleeps to start",
            )
        for pid in [sleeper.pid, *map(int, children)]:
            wait_until(lambda p=pid: _gone(p), what=f"process {pid} to end with its sandbox")


def test_processes_over_the_ray_transport(platform, api):
    async def scenario() -> None:
        client = AsyncClient.from_ray(namespace=NAMESPACE)
        async with client, client.sandbox(ttl_seconds=300) as sb:
            p = await sb.process.start("for i in 1 2 3; do echo line$i; done", env={"A": "1"})
            assert [line async for line in p.stdout] == ["line1", "line2", "line3"]
            assert (await p.wait(timeout=60)).exit_code == 0
            items = [i async for i in client.process_output(sb.id, p.pid, offset=0, follow=False)]
            assert isinstance(items[-1], ProcessOutputEnd) and items[-1].next == 18
            small = await sb.process.start("seq 1 1000", max_output_bytes=10)
            await small.wait(timeout=60)
            marks = [i async for i in client.process_output(sb.id, small.pid)]
            assert isinstance(marks[0], ProcessTruncated)
            cat = await sb.process.start(["cat"], stdin=True)
            await cat.send_input(b"\x00\xffbin", eof=True)
            assert (await cat.wait(timeout=60)).exit_code == 0
            assert await cat.stdout.read() == b"\x00\xffbin"
            sleeper = await sb.process.start(["sleep", "1000"])
            await sleeper.signal("INT")
            assert (await sleeper.wait(timeout=60)).signal == 2
            assert len(await sb.process.list()) == 4
            with pytest.raises(ProcessNotFound):
                await client.process_status(sb.id, 999999)

    asyncio.run(scenario())
