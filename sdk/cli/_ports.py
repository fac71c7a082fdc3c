"""``rock sandbox port-forward ID [LOCAL:]REMOTE``: a local listener whose connections are
tunnelled to a port inside a sandbox (through ``/v1/sandboxes/{id}/ports/{port}/tcp``).

Each accepted local connection gets its own tunnel; half-closes pass through both ways.
Ctrl-C (or SIGTERM) stops listening, resets the open tunnels and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Annotated

import typer

from rock_serve.errors import RockError
from rock_serve.sdk._async import AsyncClient
from rock_serve.sdk._async_ports import AsyncPortStream
from rock_serve.sdk.cli._sandbox import BaseUrl, Token, err, sandbox_app

__all__ = ["parse_mapping", "port_forward"]


def parse_mapping(mapping: str) -> tuple[int, int]:
    """``LOCAL:REMOTE`` or ``REMOTE`` (local = remote) -> (local, remote); local 0 = any."""
    local_s, sep, remote_s = mapping.rpartition(":")
    if not sep:
        local_s = remote_s
    try:
        local, remote = int(local_s), int(remote_s)
    except ValueError:
        raise typer.BadParameter(f"{mapping!r} is not LOCAL:REMOTE (two port numbers)") from None
    if not 0 <= local < 65536 or not 0 < remote < 65536:
        raise typer.BadParameter(f"{mapping!r}: ports must be in 1..65535 (local may be 0)")
    return local, remote


async def _pump_up(reader: asyncio.StreamReader, stream: AsyncPortStream) -> None:
    while data := await reader.read(1 << 16):
        await stream.write(data)
    await stream.write_eof()


async def _pump_down(stream: AsyncPortStream, writer: asyncio.StreamWriter) -> None:
    while data := await stream.read():
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _serve(sandbox_id: str, local: int, remote: int, client: AsyncClient) -> None:
    sandbox = await client.get_sandbox(sandbox_id)  # typed errors before listening
    from rock_serve.sdk._async_sandbox import AsyncSandbox

    ports = AsyncSandbox(client, sandbox, delete_on_exit=False, heartbeat=False).ports
    live: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        live.add(task)
        try:
            async with ports.connect(remote) as stream:
                up = asyncio.ensure_future(_pump_up(reader, stream))
                try:
                    await _pump_down(stream, writer)
                    await up  # the sandbox side is done; let the local side finish sending
                finally:
                    up.cancel()
                    await asyncio.gather(up, return_exceptions=True)
        except RockError as exc:
            err.print(f"[red]error[/red] [bold]{exc.code.value}[/bold]: {exc.message}")
        except (ConnectionError, OSError):
            pass
        finally:
            live.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", local)
    bound = server.sockets[0].getsockname()[1]
    err.print(f"Forwarding 127.0.0.1:{bound} -> {sandbox_id}:{remote} (Ctrl-C to stop)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with server:
            await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        server.close()
        for task in list(live):
            task.cancel()
        await asyncio.gather(*live, return_exceptions=True)
        err.print("Stopped forwarding.")


@sandbox_app.command("port-forward")
def port_forward(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id.")],
    mapping: Annotated[str, typer.Argument(help="LOCAL:REMOTE ports (LOCAL 0 = any free).")],
    url: BaseUrl = None,
    token: Token = None,
) -> None:
    """Listen on 127.0.0.1:LOCAL and tunnel each connection to REMOTE inside the sandbox."""
    local, remote = parse_mapping(mapping)

    async def main() -> None:
        async with AsyncClient(url, token=token) as client:
            await _serve(sandbox_id, local, remote, client)

    try:
        asyncio.run(main())
    except RockError as exc:
        err.print(f"[red]error[/red] [bold]{exc.code.value}[/bold]: {exc.message}")
        raise typer.Exit(1) from None
    except OSError as exc:
        err.print(f"[red]error[/red]: cannot listen on 127.0.0.1:{local}: {exc}")
        raise typer.Exit(1) from None
