"""``rock sandbox create|ls|exec|shell|cp|rm`` through the SDK's sync client."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rock_serve.errors import RockError
from rock_serve.protocol import OutputChunk, PtyResize, decode_text
from rock_serve.sdk import Client, ClientSettings

sandbox_app = typer.Typer(help="Create, list, use and remove sandboxes.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

BaseUrl = Annotated[str | None, typer.Option("--url", envvar="ROCK_BASE_URL", help="Platform URL.")]
Token = Annotated[str | None, typer.Option(envvar="ROCK_TOKEN", help="Bearer token.")]


def _client(url: str | None, token: str | None) -> Client:
    return Client(url, token=token)


def _fail(exc: RockError) -> typer.Exit:
    err.print(f"[red]error[/red] [bold]{exc.code.value}[/bold]: {exc.message}")
    return typer.Exit(1)


def _snapshot_fields(
    snapshot: str | None, resources: dict[str, Any], network: str
) -> dict[str, Any]:
    """Over a snapshot, resources and network default to the snapshot's (unless given)."""
    if snapshot is None:
        return {"resources": resources, "network": network}
    out: dict[str, Any] = {"snapshot": snapshot}
    if resources:
        out["resources"] = resources
    if network != "none":
        out["network"] = network
    return out


@sandbox_app.command("create")
def create(
    image: Annotated[str | None, typer.Option(help="Image or rootfs.")] = None,
    ttl: Annotated[float | None, typer.Option(help="Hard deadline in seconds.")] = None,
    memory_mb: Annotated[int | None, typer.Option(help="Memory limit in MiB.")] = None,
    cpus: Annotated[float | None, typer.Option(help="CPU quota in cores.")] = None,
    owner: Annotated[str, typer.Option(help="Owner recorded on the sandbox.")] = "",
    label: Annotated[list[str] | None, typer.Option(help="k=v label (repeatable).")] = None,
    network: Annotated[str, typer.Option(help="none (loopback only) or bridge.")] = "none",
    egress: Annotated[
        list[str] | None,
        typer.Option(help="Allowed destination cidr|host[:port] for bridge (repeatable)."),
    ] = None,
    snapshot: Annotated[str | None, typer.Option(help="Create over this snapshot's files.")] = None,
    url: BaseUrl = None,
    token: Token = None,
) -> None:
    """Create a sandbox and print its id."""
    labels = dict(item.split("=", 1) for item in (label or []) if "=" in item)
    resources = {k: v for k, v in {"memory_mb": memory_mb, "cpus": cpus}.items() if v is not None}
    with _client(url, token) as client:
        try:
            rec = client.create_sandbox(
                image=image,
                ttl_seconds=ttl,
                owner=owner,
                labels=labels,
                egress=egress or None,
                **_snapshot_fields(snapshot, resources, network),
            )
        except RockError as exc:
            raise _fail(exc) from None
    console.print(rec.id)


@sandbox_app.command("ls")
def ls(
    owner: Annotated[str | None, typer.Option(help="Only this owner's sandboxes.")] = None,
    url: BaseUrl = None,
    token: Token = None,
) -> None:
    """List sandboxes."""
    with _client(url, token) as client:
        try:
            items = client.list_sandboxes(owner=owner)
        except RockError as exc:
            raise _fail(exc) from None
    table = Table("id", "state", "owner", "worker", "age s", "expires in s")
    now = time.time()
    for rec in items:
        expires = f"{rec.expires_at - now:.0f}" if rec.expires_at else "-"
        table.add_row(
            rec.id, rec.state.value, rec.owner, rec.worker, f"{now - rec.created_at:.0f}", expires
        )
    console.print(table)


@sandbox_app.command("exec")
def exec_(
    sandbox_id: str,
    command: Annotated[list[str], typer.Argument(help="Command; one argument runs in bash.")],
    timeout: Annotated[float, typer.Option(help="Seconds before it is killed.")] = 300,
    url: BaseUrl = None,
    token: Token = None,
) -> None:
    """Run a command, stream its output, exit with its exit code."""
    cmd: str | list[str] = command[0] if len(command) == 1 else command
    code = 1
    with _client(url, token) as client:
        try:
            for item in client.stream_exec(sandbox_id, cmd, timeout=timeout):
                if isinstance(item, OutputChunk):
                    out = sys.stdout if item.stream != "stderr" else sys.stderr
                    out.buffer.write(decode_text(item.data, item.encoding))
                    out.flush()
                else:
                    code = item.exit_code
                    if item.timed_out:
                        err.print(f"[yellow]timed out after {timeout} s[/yellow]")
        except RockError as exc:
            raise _fail(exc) from None
    raise typer.Exit(code)


def _pty_url(settings: ClientSettings, sandbox_id: str, cols: int, rows: int) -> str:
    base = settings.base_url.rstrip("/")
    scheme, sep, rest = base.partition("://")
    ws_scheme = {"http": "ws", "https": "wss"}.get(scheme.lower(), scheme)
    return f"{ws_scheme}{sep}{rest}/v1/sandboxes/{sandbox_id}/pty?cols={cols}&rows={rows}"


def _terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except (OSError, ValueError):
        return 80, 24
    return size.columns or 80, size.lines or 24


def _forward_stdin(ws: Any, interactive: bool) -> None:
    """Send local stdin to the pty; at the end of a piped stdin, type the terminal's EOF."""
    fd = sys.stdin.fileno()
    try:
        while data := os.read(fd, 4096):
            ws.send(data)
        while not interactive:
            # Ctrl-D until the shell exits: one typed while the terminal is still in canonical
            # mode (before bash's line editor starts, or while a command runs) can be lost.
            ws.send(b"\x04")
            time.sleep(0.2)
    except Exception:
        pass  # the connection is gone: the main loop reports why


@sandbox_app.command("shell")
def shell(
    sandbox_id: str,
    url: BaseUrl = None,
    token: Token = None,
) -> None:
    """Open an interactive shell in a sandbox; exit with the shell's exit code.

    With a terminal on stdin it runs in raw mode and follows window resizes; with a pipe,
    the piped text is typed into the shell, followed by Ctrl-D.
    """
    try:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect
    except ImportError:
        err.print("[red]error[/red]: `rock sandbox shell` needs the websockets package")
        raise typer.Exit(2) from None
    settings = ClientSettings.from_env(base_url=url, token=token)
    headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
    cols, rows = _terminal_size()
    interactive = sys.stdin.isatty()
    code = 1
    try:
        ws = connect(
            _pty_url(settings, sandbox_id, cols, rows),
            additional_headers=headers,
            open_timeout=settings.timeout,
        )
    except (OSError, TimeoutError) as exc:
        err.print(f"[red]error[/red]: cannot connect to {settings.base_url}: {exc}")
        raise typer.Exit(1) from None
    restore: Any = None
    old_winch: Any = None
    with ws:
        if interactive:
            import termios
            import tty

            fd = sys.stdin.fileno()
            attrs = termios.tcgetattr(fd)
            restore = lambda: termios.tcsetattr(fd, termios.TCSADRAIN, attrs)  # noqa: E731
            tty.setraw(fd)

            def _resend_size(*_: object) -> None:
                c, r = _terminal_size()
                message = PtyResize(cols=c, rows=r).model_dump_json()
                # Not from the handler itself: the main thread may hold the socket's lock.
                threading.Thread(target=ws.send, args=(message,), daemon=True).start()

            old_winch = signal.signal(signal.SIGWINCH, _resend_size)
        try:
            threading.Thread(target=_forward_stdin, args=(ws, interactive), daemon=True).start()
            while True:
                try:
                    message = ws.recv()
                except ConnectionClosed:
                    break
                if isinstance(message, bytes):
                    sys.stdout.buffer.write(message)
                    sys.stdout.flush()
                    continue
                body = json.loads(message)
                if body.get("type") == "exit":
                    code = int(body["exit_code"])
                elif "error" in body:
                    if restore is not None:
                        restore()
                    error = body["error"]
                    err.print(f"[red]error[/red] [bold]{error['code']}[/bold]: {error['message']}")
        finally:
            if old_winch is not None:
                signal.signal(signal.SIGWINCH, old_winch)
            if restore is not None:
                with contextlib.suppress(Exception):
                    restore()
    raise typer.Exit(code)


@sandbox_app.command("cp")
def cp(
    source: Annotated[str, typer.Argument(help="LOCAL_PATH or SANDBOX_ID:PATH.")],
    dest: Annotated[str, typer.Argument(help="LOCAL_PATH or SANDBOX_ID:PATH.")],
    url: BaseUrl = None,
    token: Token = None,
) -> None:
    """Copy one file into or out of a sandbox."""
    with _client(url, token) as client:
        try:
            if ":" in source and not Path(source).exists():
                sandbox_id, path = source.split(":", 1)
                Path(dest).write_bytes(client.read_file(sandbox_id, path))
            elif ":" in dest:
                sandbox_id, path = dest.split(":", 1)
                client.write_file(sandbox_id, path, Path(source).read_bytes())
            else:
                err.print("one side must be SANDBOX_ID:PATH")
                raise typer.Exit(2)
        except RockError as exc:
            raise _fail(exc) from None


@sandbox_app.command("rm")
def rm(
    sandbox_ids: Annotated[list[str], typer.Argument(help="Sandboxes to delete.")],
    url: BaseUrl = None,
    token: Token = None,
) -> None:
    """Delete sandboxes."""
    failed = False
    with _client(url, token) as client:
        for sandbox_id in sandbox_ids:
            try:
                client.delete_sandbox(sandbox_id)
                console.print(f"removed {sandbox_id}")
            except RockError as exc:
                failed = True
                err.print(f"[red]{sandbox_id}[/red]: {exc.code.value}: {exc.message}")
    raise typer.Exit(1 if failed else 0)
