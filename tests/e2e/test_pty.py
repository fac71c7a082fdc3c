"""The WebSocket pty end to end: client -> Serve proxy -> Admin -> Worker -> rocklet pty."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from .conftest import Platform

websockets_sync = pytest.importorskip("websockets.sync.client")

pytestmark = pytest.mark.ray


def _ws_url(platform: Platform, sandbox_id: str, query: str = "") -> str:
    return platform.url.replace("http://", "ws://", 1) + f"/v1/sandboxes/{sandbox_id}/pty{query}"


def _read_until(ws, pattern: bytes, seen: bytearray, timeout: float = 20) -> re.Match[bytes]:
    deadline = time.monotonic() + timeout
    while (m := re.search(pattern, seen)) is None:
        try:
            message = ws.recv(timeout=max(deadline - time.monotonic(), 0.01))
        except TimeoutError:
            raise AssertionError(f"no {pattern!r} in {bytes(seen)!r}") from None
        assert isinstance(message, bytes), (message, bytes(seen))
        seen.extend(message)
    return m


def _sandbox(api) -> str:
    resp = api.post("/v1/sandboxes", json={"owner": "pty-test", "ttl_seconds": 120})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def test_pty_echo_resize_and_exit_code(platform, api):
    sandbox_id = _sandbox(api)
    with websockets_sync.connect(_ws_url(platform, sandbox_id, "?cols=100&rows=30")) as ws:
        seen = bytearray()
        ws.send(b"stty size; echo $((40 + 2))-ok\n")
        _read_until(ws, rb"30 100\r\n", seen)
        _read_until(ws, rb"42-ok", seen)
        ws.send(json.dumps({"type": "resize", "cols": 132, "rows": 43}))
        ws.send(b"stty size\n")
        _read_until(ws, rb"43 132\r\n", seen)
        ws.send(b"exit 3\n")
        while isinstance(message := ws.recv(timeout=20), bytes):
            seen.extend(message)
        assert json.loads(message) == {"type": "exit", "exit_code": 3}
        with pytest.raises(Exception, match="1000"):
            ws.recv(timeout=10)


def test_pty_bad_control_message_is_reported(platform, api):
    sandbox_id = _sandbox(api)
    with websockets_sync.connect(_ws_url(platform, sandbox_id)) as ws:
        ws.send(json.dumps({"type": "shrink"}))
        message = ws.recv(timeout=20)
        while isinstance(message, bytes):  # the prompt may come first
            message = ws.recv(timeout=20)
        assert json.loads(message)["error"]["code"] == "invalid_request"
        seen = bytearray()
        ws.send(b"echo still-$((1+1))\n")
        _read_until(ws, rb"still-2", seen)


def test_pty_unknown_sandbox_is_a_typed_error(platform, api):
    bad_ids = ["sb-000000000000-0000000000000000", "nope"]
    for sandbox_id in bad_ids:
        with websockets_sync.connect(_ws_url(platform, sandbox_id)) as ws:
            body = json.loads(ws.recv(timeout=20))
            assert body["error"]["code"] == "sandbox_not_found"
            with pytest.raises(Exception, match="1008"):
                ws.recv(timeout=10)


def test_pty_disconnect_kills_the_shell(platform, api):
    sandbox_id = _sandbox(api)
    with websockets_sync.connect(_ws_url(platform, sandbox_id)) as ws:
        seen = bytearray()
        ws.send(b"sleep 300 & echo pid=$!.\n")
        pid = int(_read_until(ws, rb"pid=(\d+)\.", seen).group(1))
    probe = f"kill -0 {pid} 2>/dev/null; echo $?"
    for _ in range(100):
        out = api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"command": probe}).json()
        if out["stdout"].strip() == "1":
            break
        time.sleep(0.1)
    assert out["stdout"].strip() == "1", "the shell's job survived the disconnect"


def _rock_shell(
    platform: Platform, sandbox_id: str, stdin: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rock_serve.sdk.cli", "sandbox", "shell", sandbox_id],
        input=stdin,
        env={**os.environ, "ROCK_BASE_URL": platform.url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_shell_with_piped_stdin(platform, api):
    sandbox_id = _sandbox(api)
    ran = _rock_shell(platform, sandbox_id, "echo cli-$((6*7))\nexit 7\n")
    assert ran.returncode == 7, ran.stderr
    assert "cli-42" in ran.stdout
    # At the end of piped input the shell gets Ctrl-D and exits with the last status.
    ran = _rock_shell(platform, sandbox_id, "echo eof-$((1+1))\n")
    assert ran.returncode == 0, ran.stderr
    assert "eof-2" in ran.stdout


def test_cli_shell_unknown_sandbox(platform, api):
    ran = _rock_shell(platform, "sb-000000000000-0000000000000000", "")
    assert ran.returncode == 1
    assert "sandbox_not_found" in ran.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_cli_shell_interactive_in_tmux(platform, api, tmp_path):
    """A real terminal: raw mode, window resize, Ctrl-C, the exit code, the terminal restored."""
    sandbox_id = _sandbox(api)
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock"), "-f", "/dev/null"]
    rc_file = tmp_path / "rc"
    command = (
        f"ROCK_BASE_URL={shlex.quote(platform.url)} {shlex.quote(sys.executable)} "
        f"-m rock_serve.sdk.cli sandbox shell {sandbox_id}; "
        f"echo $? > {shlex.quote(str(rc_file))}; stty -a | grep -o ' icanon' ; sleep 60"
    )

    def screen() -> str:
        return subprocess.run(
            [*tmux, "capture-pane", "-p", "-S", "-200"], capture_output=True, text=True
        ).stdout

    def wait_for(pattern: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while re.search(pattern, screen()) is None:
            assert time.monotonic() < deadline, f"no {pattern!r} on the screen:\n{screen()}"
            time.sleep(0.1)

    def job_running() -> bool:
        command = (
            "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f 2>/dev/null; echo; done"
            " | grep -q '^sleep 30[.]5'"
        )
        reply = api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"command": command})
        return bool(reply.json()["exit_code"] == 0)

    def keys(*args: str) -> None:
        subprocess.run([*tmux, "send-keys", *args], check=True)

    subprocess.run([*tmux, "new-session", "-d", "-x", "100", "-y", "30", command], check=True)
    try:
        wait_for(r"bash-[\d.]+#")
        keys("stty size", "Enter")
        wait_for(r"\n30 100\n")
        subprocess.run([*tmux, "resize-window", "-x", "120", "-y", "40"], check=True)
        # SIGWINCH -> a resize message: ask again until the shell has seen it (no fixed wait).
        deadline = time.monotonic() + 30
        while re.search(r"\n40 120\n", screen()) is None:
            assert time.monotonic() < deadline, f"the resize never arrived:\n{screen()}"
            keys("stty size", "Enter")
            time.sleep(0.2)
        keys("sleep 30.5", "Enter")
        deadline = time.monotonic() + 30
        while not job_running():  # ^C once the job runs (one racing the line is eaten)
            assert time.monotonic() < deadline, screen()
            time.sleep(0.1)
        keys("C-c")
        keys("echo int-$((1+1))", "Enter")
        wait_for(r"\nint-2\n", timeout=10)  # well before the sleep ends
        keys("exit 5", "Enter")
        deadline = time.monotonic() + 30
        while not rc_file.exists() or not rc_file.read_text().strip():
            assert time.monotonic() < deadline, screen()
            time.sleep(0.1)
        assert rc_file.read_text().strip() == "5"
        wait_for(r"\n icanon\n")  # the local terminal is back in canonical mode
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
