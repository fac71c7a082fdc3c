"""The Serve application: ``serve_config.yaml`` points ``import_path`` at :func:`build_app`."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from rock_serve.config import parse_server_args
from rock_serve.deployments.admin import Admin

__all__ = ["build_app"]


def build_app(args: dict[str, Any]) -> Application:
    """Build the rock-serve application from ``serve_config.yaml``'s ``args:``.

    The args are validated here (a bad config fails the deploy, with every problem listed) and
    handed to the Admin. The Scheduler and Workers are detached actors that the Admin gets or
    creates on start-up, so building the app needs no running cluster (``serve build`` works)
    and sandboxes outlive Admin redeploys.

    Raises:
        InvalidConfig: the args do not parse as :class:`~rock_serve.config.ServerArgs`.
    """
    server_args = parse_server_args(args)
    admin: Any = Admin  # a serve.Deployment; its decorators hide that from the type checker
    application: Application = admin.bind(server_args.model_dump(mode="json"))
    return application
