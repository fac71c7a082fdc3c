"""The Serve application: ``serve_config.yaml`` points ``import_path`` at :func:`build_app`."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from rock_serve.config import parse_server_args
from rock_serve.deployments._gem_app import GemApi
from rock_serve.deployments.admin import Admin

__all__ = ["build_app"]


def build_app(args: dict[str, Any]) -> Application:
    """Build the rock-serve application from ``serve_config.yaml``'s ``args:``.

    The args are validated here (a bad config fails the deploy, with every problem listed) and
    handed to the Admin and to the GEM env API's deployment (:class:`GemApi`), which the Admin's
    GEM routes call through its handle. The Scheduler and Workers are detached actors that the
    Admin gets or creates on start-up, so building the app needs no running cluster (``serve
    build`` works) and sandboxes outlive Admin redeploys.

    Raises:
        InvalidConfig: the args do not parse as :class:`~rock_serve.config.ServerArgs`.
    """
    server_args = parse_server_args(args)
    admin: Any = Admin  # a serve.Deployment; its decorators hide that from the type checker
    gem: Any = GemApi
    data = server_args.model_dump(mode="json")
    application: Application = admin.bind(data, gem.bind(data))
    return application
