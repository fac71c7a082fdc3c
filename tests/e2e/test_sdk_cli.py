"""The SDK (both twins) and the ``rock`` CLI against the real platform on Ray Serve."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rock_serve.errors import SandboxNotFound, SessionNotFound
from rock_serve.protocol import ExecResult, OutputChunk
from rock_serve.sdk import AsyncClient, Client

pytestmark = pytest.mark.ray


def test_sync_sandbox_session_files_and_cleanup(platform, api):
    with Client(platform.url) as client:
        with client.sandbox(owner="sdk-test", ttl_seconds=120) as sb:
            assert sb.id.startswith("sb-")
            sb.run("mkdir -p work && cd work && export GREETING=hi")
            result = sb.run("echo $GREETING from $(basename $PWD)")
            assert (result.output, result.exit_code) == ("hi from work\n", 0)
            sb.files.write("work/data.bin", b"\x00\xffbinary")
            assert sb.files.read("work/data.bin") == b"\x00\xffbinary"
            listing = client.exec(sb.id, ["ls", "work"])
            assert listing.stdout == "data.bin\n"
            items = list(client.stream_exec(sb.id, "echo out; echo err >&2"))
            assert isinstance(items[-1], ExecResult)
            assert {(i.stream, i.data) for i in items if isinstance(i, OutputChunk)} == {
                ("stdout", "out\n"),
                ("stderr", "err\n"),
            }
            with pytest.raises(SessionNotFound):
                client.run(sb.id, "echo", session="nope")
            sandbox_id = sb.id
            assert [r.id for r in client.list_sandboxes(owner="sdk-test")] == [sandbox_id]
        with pytest.raises(SandboxNotFound):
            client.get_sandbox(sandbox_id)


def test_sandbox_is_deleted_when_the_block_raises(platform, api):
    with Client(platform.url) as client:
        with pytest.raises(RuntimeError, match="agent crashed"):
            with client.sandbox() as sb:
                sandbox_id = sb.id
                raise RuntimeError("agent crashed")
        with pytest.raises(SandboxNotFound):
            client.get_sandbox(sandbox_id)


async def test_async_twin(platform, api):
    async with AsyncClient(platform.url) as client:
        async with client.sandbox(ttl_seconds=120) as sb:
            assert (await sb.run("X=7; echo $((X*6))")).output == "42\n"
            chunks = [i async for i in sb.stream_run("for i in 1 2; do echo $i; done")]
            text = "".join(c.data for c in chunks if isinstance(c, OutputChunk))
            assert text == "1\n2\n"
            sandbox_id = sb.id
        with pytest.raises(SandboxNotFound):
            await client.get_sandbox(sandbox_id)


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


def test_cli_sandbox_commands(platform, api, tmp_path):
    sandbox_id = _rock(platform, "sandbox", "create", "--owner", "cli", "--ttl", "120").stdout
    sandbox_id = sandbox_id.strip()
    assert sandbox_id.startswith("sb-")
    assert sandbox_id in _rock(platform, "sandbox", "ls").stdout
    ran = _rock(platform, "sandbox", "exec", sandbox_id, "echo hello; exit 3", check=False)
    assert (ran.stdout, ran.returncode) == ("hello\n", 3)
    local = tmp_path / "in.txt"
    local.write_text("payload")
    _rock(platform, "sandbox", "cp", str(local), f"{sandbox_id}:copied.txt")
    _rock(platform, "sandbox", "cp", f"{sandbox_id}:copied.txt", str(tmp_path / "out.txt"))
    assert (tmp_path / "out.txt").read_text() == "payload"
    status = _rock(platform, "status", "--api", platform.url).stdout
    assert sandbox_id in status
    _rock(platform, "sandbox", "rm", sandbox_id)
    missing = _rock(platform, "sandbox", "rm", sandbox_id, check=False)
    assert missing.returncode == 1
    assert "sandbox_not_found" in missing.stderr


def test_quickstart_example_runs(platform, api):
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"
    result = subprocess.run(
        [sys.executable, str(example)],
        env={**os.environ, "ROCK_BASE_URL": platform.url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "python3 says 42 (exit 0)" in result.stdout
    assert "timed_out=True" in result.stdout
    assert "the session survived: rock" in result.stdout


def test_archive_round_trip_through_the_sdk(platform, api):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("pkg/mod.py")
        payload = b"VALUE = 42\n"
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with Client(platform.url) as client, client.sandbox() as sb:
        client.upload_archive(sb.id, "project", buf.getvalue())
        assert (
            sb.exec(
                [
                    "python3",
                    "-c",
                    "import sys; sys.path.insert(0, 'project');import pkg.mod as m; print(m.VALUE)",
                ]
            ).stdout
            == "42\n"
        )
        names = tarfile.open(
            fileobj=io.BytesIO(client.download_archive(sb.id, "project"))
        ).getnames()
        assert "./pkg/mod.py" in names
