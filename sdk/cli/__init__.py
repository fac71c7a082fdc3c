"""The ``rock`` command line."""

from rock_serve.sdk.cli._app import app, main

__all__ = ["app", "main"]
