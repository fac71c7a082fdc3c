"""Standalone rocklet over HTTP: ``python -m rock_serve.rocklet --host H --port P [--token T]``.

Starts a local rocklet agent and serves it with :func:`rock_serve.rocklet.http.create_app` on
uvicorn. It speaks the SWE-ReX remote-runtime protocol (plus ``/rock/v1/...``), so
``swerex.runtime.remote.RemoteRuntime`` can drive it. A token (``--token`` or the environment
variable ``ROCK_ROCKLET_TOKEN``) is required unless the server binds to loopback only.
Once it accepts connections it prints one line, ``rocklet listening on http://HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import socket
import sys

import uvicorn

from rock_serve.rocklet.handle import AGENT_PATH, RockletHandle
from rock_serve.rocklet.http import create_app

__all__ = ["is_loopback", "main"]

TOKEN_ENV = "ROCK_ROCKLET_TOKEN"


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts local connections (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rock_serve.rocklet",
        description="Serve a local rocklet over HTTP (SWE-ReX remote-runtime protocol).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8000, help="Port to bind; 0 picks a free one.")
    parser.add_argument(
        "--token",
        default=None,
        help=f"Required X-API-Key value (default: ${TOKEN_ENV}); needed off loopback.",
    )
    parser.add_argument("--root", default=None, help="Confine file operations to this directory.")
    parser.add_argument("--python", default=sys.executable, help="Interpreter that runs the agent.")
    parser.add_argument("--log-level", default="warning", help="uvicorn log level.")
    return parser


async def _serve(args: argparse.Namespace, token: str | None) -> int:
    argv = [args.python, "-I", AGENT_PATH]
    if args.root:
        argv += ["--root", args.root]

    async def factory() -> RockletHandle:
        handle = await RockletHandle.spawn(argv, name="rocklet")
        await handle.ping()
        return handle

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets whose proto says TCP,
    # and without it every keep-alive response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host.strip("[]"), args.port))
    except OSError as exc:
        sock.close()
        print(f"rocklet: cannot bind {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        create_app(factory, token=token),
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        print(f"rocklet listening on http://{shown}:{port}", flush=True)
    await task
    sock.close()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and serve until SIGINT or SIGTERM; returns the exit status.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 after a clean shutdown, 1 if the server could not start, 2 on bad arguments
        (including a missing token off loopback).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if not token and not is_loopback(args.host):
        print(
            f"rocklet: refusing to serve {args.host} without a token: pass --token or set "
            f"{TOKEN_ENV} (only loopback addresses may run without one)",
            file=sys.stderr,
        )
        return 2
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_serve(args, token))
    return 130


if __name__ == "__main__":
    sys.exit(main())
