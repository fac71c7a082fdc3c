"""``rock sandbox snapshot ID`` and ``rock snapshot ls|rm`` (issue 16) through the sync client.

Restore one with ``rock sandbox create --snapshot SNAP_ID``.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table

from rock_serve.errors import RockError
from rock_serve.protocol.snapshot import SnapshotRequest
from rock_serve.sdk.cli._sandbox import BaseUrl, Token, _client, _fail, console, err, sandbox_app

snapshot_app = typer.Typer(help="List and remove sandbox snapshots.", no_args_is_help=True)


@sandbox_app.command("snapshot")
def snapshot(
    sandbox_id: str,
    label: Annotated[list[str] | None, typer.Option(help="k=v label (repeatable).")] = None,
    url: BaseUrl = None,
    token: Token = None,
) -> None:
    """Snapshot a running sandbox's files and print the snapshot id."""
    labels = dict(item.split("=", 1) for item in label) if label else None
    with _client(url, token) as client:
        try:
            snap = client.snapshot_sandbox(sandbox_id, SnapshotRequest(labels=labels))
        except RockError as exc:
            raise _fail(exc) from None
    console.print(snap.id)


@snapshot_app.command("ls")
def ls(url: BaseUrl = None, token: Token = None) -> None:
    """List the namespace's snapshots, newest first."""
    with _client(url, token) as client:
        try:
            items = client.list_snapshots()
        except RockError as exc:
            raise _fail(exc) from None
    table = Table("id", "sandbox", "image", "size MB", "age s", "node", "s3")
    now = time.time()
    for snap in items:
        table.add_row(
            snap.id,
            snap.sandbox_id,
            snap.image or "-",
            f"{snap.size / 1e6:.1f}",
            f"{now - snap.created_at:.0f}",
            snap.node,
            "yes" if snap.in_s3 else "no",
        )
    console.print(table)


@snapshot_app.command("rm")
def rm(
    snapshot_ids: Annotated[list[str], typer.Argument(help="Snapshots to delete.")],
    url: BaseUrl = None,
    token: Token = None,
) -> None:
    """Delete snapshots."""
    failed = False
    with _client(url, token) as client:
        for snapshot_id in snapshot_ids:
            try:
                client.delete_snapshot(snapshot_id)
                console.print(f"removed {snapshot_id}")
            except RockError as exc:
                failed = True
                err.print(f"[red]{snapshot_id}[/red]: {exc.code.value}: {exc.message}")
    raise typer.Exit(1 if failed else 0)
