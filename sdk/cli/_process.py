"""``rock sandbox process start|ls|logs|kill|wait``: background processes through the SDK."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from rock_serve.errors import RockError, Timeout
from rock_serve.protocol.processes import (
    ProcessOutputChunk,
    ProcessOutputEnd,
    ProcessStream,
    ProcessTruncated,
)
from rock_serve.sdk import Client

process_app = typer.Typer(
    help="Background processes in a sandbox: start, list, logs, kill, wait.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)

BaseUrl = Annotated[str | None, typer.Option("--url", envvar="ROCK_BASE_URL", help="Platform URL.")]
Token = Annotated[str | None, typer.Option(envvar="ROCK_TOKEN", help="Bearer token.")]


def _fail(exc: RockError) -> typer.Exit:
    err.print(f"[red]error[/red] [bold]{exc.code.value}[/bold]: {exc.message}")
    return typer.Exit(1)


@process_app.command("start")
def start(
    sandbox_id: str,
    command: Annotated[list[str], typer.Argument(help="Command; one argument runs in bash.")],
    env: Annotated[list[str] | None, typer.Option(help="K=V variable (repeatable).")] = None,
    cwd: Annotated[str | None, typer.Option(help="Working directory.")] = None,
    stdin: Annotated[bool, typer.Option(help="Keep a stdin pipe for later input.")] = False,
    url: BaseUrl = None,
    token: Token = None,
) -> None:
    """Start a command in the background and print its pid."""
    cmd: str | list[str] = command[0] if len(command) == 1 else command
    variables = dict(item.split("=", 1) for item in (env or []) if "=" in item)
    with Client(url, token=token) as client:
        try:
            info = client.start_process(
                sandbox_id, cmd, env=variables or None, cwd=cwd, stdin=stdin
            )
        except RockError as exc:
            raise _fail(exc) from None
    console.print(info.pid)


@process_app.command("ls")
def ls(sandbox_id: str, url: BaseUrl = None, token: Token = None) -> None:
    """List the sandbox's running and recently ended background processes."""
    with Client(url, token=token) as client:
        try:
            listed = client.list_processes(sandbox_id)
        except RockError as exc:
            raise _fail(exc) from None
    table = Table("pid", "state", "exit", "age s", "stdout B", "stderr B", "command")
    now = time.time()
    for p in listed.processes:
        state = "running" if p.running else ("killed" if p.signal else "exited")
        exit_code = "-" if p.exit_code is None else str(p.exit_code)
        table.add_row(
            str(p.pid),
            state,
            exit_code,
            f"{now - p.started_at:.0f}",
            str(p.stdout_bytes),
            str(p.stderr_bytes),
            " ".join(p.command),
        )
    console.print(table)


@process_app.command("logs")
def logs(
    sandbox_id: str,
    pid: int,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Follow until it ends.")] = False,
    stderr: Annotated[bool, typer.Option(help="Show stderr instead of stdout.")] = False,
    offset: Annotated[int, typer.Option(help="Start at this byte offset.")] = 0,
    url: BaseUrl = None,
    token: Token = None,
) -> None:
    """Print a process's output (stdout by default); ``-f`` follows it until it ends."""
    stream: ProcessStream = "stderr" if stderr else "stdout"
    out = sys.stdout.buffer
    with Client(url, token=token) as client:
        try:
            for item in client.process_output(
                sandbox_id, pid, stream=stream, offset=offset, follow=follow
            ):
                if isinstance(item, ProcessTruncated):
                    err.print(
                        f"[yellow]bytes before offset {item.truncated_before} are gone "
                        "(output buffer full)[/yellow]"
                    )
                elif isinstance(item, ProcessOutputChunk):
                    out.write(item.data_bytes())
                    out.flush()
                elif isinstance(item, ProcessOutputEnd) and follow:
                    err.print(f"[dim]ended: exit code {item.process.exit_code}[/dim]")
        except RockError as exc:
            raise _fail(exc) from None


@process_app.command("kill")
def kill(
    sandbox_id: str,
    pid: int,
    signal: Annotated[
        str | None, typer.Option("--signal", "-s", help="Send this signal instead of SIGKILL.")
    ] = None,
    url: BaseUrl = None,
    token: Token = None,
) -> None:
    """SIGKILL a process's group (or send ``--signal``)."""
    with Client(url, token=token) as client:
        try:
            if signal is None:
                info = client.kill_process(sandbox_id, pid)
            else:
                sig: int | str = int(signal) if signal.isdigit() else signal
                info = client.signal_process(sandbox_id, pid, sig)
        except RockError as exc:
            raise _fail(exc) from None
    state = "running" if info.running else f"exit code {info.exit_code}"
    console.print(f"{info.pid}: {state}")


@process_app.command("wait")
def wait(
    sandbox_id: str,
    pid: int,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait at most.")] = None,
    url: BaseUrl = None,
    token: Token = None,
) -> None:
    """Wait until a process ends; exit with its exit code."""
    with Client(url, token=token) as client:
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                step = 30.0 if left is None else min(left, 30.0)
                try:
                    info = client.wait_process(sandbox_id, pid, step)
                    break
                except Timeout:
                    if left is not None and left <= step:
                        raise
        except RockError as exc:
            raise _fail(exc) from None
    raise typer.Exit(info.exit_code or 0)
