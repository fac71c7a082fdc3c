"""The ``rock`` command line (the ``cli`` extra: typer, rich, pyyaml, websockets)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rock_serve.sdk.cli._app import app

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``rock`` console script; names the missing extra instead of a trace."""
    from rock_serve._extras import MissingExtra, require

    try:
        for module in ("typer", "rich", "yaml"):
            require(module, "cli", "the rock command line")
    except MissingExtra as exc:
        print(f"rock: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from rock_serve.sdk.cli._app import main as run

    run()


def __getattr__(name: str) -> Any:
    if name == "app":
        from rock_serve.sdk.cli._app import app

        return app
    raise AttributeError(name)
