"""``rock token create|hash``: make bearer tokens and the hashed entries the server accepts.

The token itself is printed once, on stdout, and nowhere stored by the server: the server's
config or token file holds only its SHA-256 (``auth.tokens`` / ``auth.token_file``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console

from rock_serve.auth import (
    credentials_path,
    generate_token,
    hash_token,
    load_token_file,
    save_token_file,
    write_credentials,
)
from rock_serve.config import TokenEntry
from rock_serve.errors import InvalidConfig

token_app = typer.Typer(help="Make bearer tokens for the REST API.", no_args_is_help=True)
err = Console(stderr=True)


@token_app.command("create")
def create(
    name: Annotated[str, typer.Option(help="Who holds it (shown in the audit log).")],
    namespace: Annotated[str, typer.Option(help="Namespace its sandboxes go to.")] = "default",
    admin: Annotated[bool, typer.Option(help="May act on every namespace.")] = False,
    role: Annotated[
        str | None,
        typer.Option(help="tenant, viewer (read-only, every namespace), operator or admin."),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(help="Token file to add the hashed entry to (created 0600 if missing)."),
    ] = None,
    save_for: Annotated[
        str | None,
        typer.Option(
            "--save-for",
            metavar="URL",
            help="Also save the token in the SDK's credentials file for this platform URL.",
        ),
    ] = None,
) -> None:
    """Print a new token on stdout and its config entry (SHA-256 only) on stderr."""
    token = generate_token()
    try:
        entry = TokenEntry.model_validate(
            {
                "name": name,
                "namespace": namespace,
                "sha256": hash_token(token),
                "admin": admin,
                "role": role,
            }
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = first["loc"][0] if first["loc"] else "role"
        err.print(f"[red]error[/red]: {where}: {first['msg']}")
        raise typer.Exit(2) from None
    if file is not None:
        try:
            entries = load_token_file(file) if file.expanduser().exists() else []
        except InvalidConfig as exc:
            err.print(f"[red]error[/red]: {exc}")
            raise typer.Exit(1) from None
        if any(e.name == name for e in entries):
            err.print(f"[red]error[/red]: {file} already has a token named {name!r}")
            raise typer.Exit(1)
        save_token_file(file, [*entries, entry])
        err.print(f"added {name!r} (namespace {namespace!r}) to {file}")
    else:
        err.print("add this entry to auth.tokens (it holds no secret):")
        err.print(yaml.safe_dump([entry.model_dump()], sort_keys=False).rstrip(), markup=False)
    if save_for is not None:
        path = credentials_path()
        write_credentials(path, save_for, token)
        err.print(f"saved for {save_for} in {path}")
    typer.echo(token)


@token_app.command("hash")
def hash_(
    token: Annotated[
        str | None,
        typer.Argument(help="The token; read from stdin when omitted (keeps it out of `ps`)."),
    ] = None,
) -> None:
    """Print the SHA-256 of a token, the ``sha256`` of its config entry."""
    value = token if token is not None else sys.stdin.readline().strip()
    if not value:
        err.print("[red]error[/red]: no token given")
        raise typer.Exit(2)
    typer.echo(hash_token(value))
