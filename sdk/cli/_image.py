"""``rock image pull|ls|rm|push``: the nodes' image stores through the SDK's sync client."""

from __future__ import annotations

import os
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from rock_serve.errors import RockError
from rock_serve.protocol import RegistryAuth
from rock_serve.sdk import Client

image_app = typer.Typer(
    help="Prepull, list, remove and push images on the nodes.", no_args_is_help=True
)
console = Console()
err = Console(stderr=True)

BaseUrl = Annotated[str | None, typer.Option("--url", envvar="ROCK_BASE_URL", help="Platform URL.")]
Token = Annotated[str | None, typer.Option(envvar="ROCK_TOKEN", help="Bearer token.")]


def _fail(exc: RockError) -> typer.Exit:
    err.print(f"[red]error[/red] [bold]{exc.code.value}[/bold]: {exc.message}")
    return typer.Exit(1)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@image_app.command("pull")
def pull(
    images: Annotated[list[str], typer.Argument(help="Image references.")],
    node: Annotated[list[str] | None, typer.Option(help="Worker name (repeatable).")] = None,
    username: Annotated[
        str | None, typer.Option(envvar="ROCK_REGISTRY_USER", help="Registry user.")
    ] = None,
    url: BaseUrl = None,
    token: Token = None,
) -> None:
    """Pull images into the nodes' stores, printing progress.

    The registry password comes from ROCK_REGISTRY_PASSWORD (never from the command line).
    """
    auth = None
    password = os.environ.get("ROCK_REGISTRY_PASSWORD")
    if username is not None:
        auth = RegistryAuth(username=username, password=password)
    failed = False
    with Client(url, token=token) as client:
        try:
            for ev in client.pull_images(images, nodes=node, auth=auth):
                where = f"{ev.node or '-'} {ev.image}"
                if ev.phase == "error":
                    failed = True
                    code = (ev.error or {}).get("code", "error")
                    msg = (ev.error or {}).get("message", "")
                    err.print(f"{where}: [red]{code}[/red] {msg}")
                elif ev.phase == "done":
                    console.print(f"{where}: done {ev.digest} {_size(ev.size_bytes or 0)}")
                else:
                    console.print(f"{where}: {ev.phase} {ev.layers_done}/{ev.layers_total}")
        except RockError as exc:
            raise _fail(exc) from None
    if failed:
        raise typer.Exit(1)


@image_app.command("ls")
def ls(url: BaseUrl = None, token: Token = None) -> None:
    """List the images on each node."""
    with Client(url, token=token) as client:
        try:
            listing = client.list_images()
        except RockError as exc:
            raise _fail(exc) from None
    table = Table("node", "refs", "id", "size", "last used s ago", "in use")
    now = time.time()
    for img in listing.images:
        table.add_row(
            img.node,
            "\n".join(img.refs),
            img.id[:19],
            _size(img.size_bytes),
            f"{now - img.last_used:.0f}",
            str(img.in_use),
        )
    console.print(table)
    for node, used in sorted(listing.disk_bytes.items()):
        console.print(f"{node}: {_size(used)} of unpacked layers")


@image_app.command("rm")
def rm(
    ref: Annotated[str, typer.Argument(help="Reference or image id.")],
    url: BaseUrl = None,
    token: Token = None,
) -> None:
    """Remove an image from every node's store."""
    with Client(url, token=token) as client:
        try:
            client.remove_image(ref)
        except RockError as exc:
            raise _fail(exc) from None
    console.print(f"removed {ref}")


@image_app.command("push")
def push(
    image: Annotated[str, typer.Argument(help="Stored image (reference or id), e.g. committed.")],
    destination: Annotated[str, typer.Argument(help="Registry reference host[:port]/repo:tag.")],
    node: Annotated[str | None, typer.Option(help="Worker whose store has it.")] = None,
    username: Annotated[
        str | None, typer.Option(envvar="ROCK_REGISTRY_USER", help="Registry user.")
    ] = None,
    url: BaseUrl = None,
    token: Token = None,
) -> None:
    """Push an image of a node's store to a registry (admin token).

    The registry password comes from ROCK_REGISTRY_PASSWORD (never from the command line).
    """
    auth = None
    if username is not None:
        auth = RegistryAuth(username=username, password=os.environ.get("ROCK_REGISTRY_PASSWORD"))
    with Client(url, token=token) as client:
        try:
            result = client.push_image(image, destination, node=node, auth=auth)
        except RockError as exc:
            raise _fail(exc) from None
    console.print(f"{result.node}: pushed {result.destination}@{result.digest}")
