"""``rock``: typer app; each command's work lives in its own module."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console

from rock_serve import __version__
from rock_serve.config import parse_runtime_config
from rock_serve.errors import RockError
from rock_serve.sdk.cli import _ports  # noqa: F401  (registers `rock sandbox port-forward`)
from rock_serve.sdk.cli._env import env_app
from rock_serve.sdk.cli._image import image_app
from rock_serve.sdk.cli._process import process_app
from rock_serve.sdk.cli._sandbox import sandbox_app
from rock_serve.sdk.cli._snapshot import snapshot_app
from rock_serve.sdk.cli._token import token_app

app = typer.Typer(
    name="rock",
    help="rock-serve: sandboxes for agentic RL.",
    no_args_is_help=True,
    add_completion=False,
)
sandbox_app.add_typer(process_app, name="process")  # rock sandbox process ... (issue 15.1)
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(env_app, name="env")
app.add_typer(token_app, name="token")
app.add_typer(image_app, name="image")
app.add_typer(snapshot_app, name="snapshot")  # rock snapshot ls|rm (issue 16)
console = Console()
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _runtime_config(runtime: str, config: Path | None) -> object:
    if config is not None:
        data = yaml.safe_load(config.read_text()) or {}
        return data.get("runtime", data) if isinstance(data, dict) else data
    return {"type": runtime}


@app.command()
def version() -> None:
    """Print the version."""
    console.print(f"rock-serve {__version__}")


@app.command()
def demo(
    runtime: Annotated[
        str, typer.Option(help="Runtime to use: bwrap (default), local or fake.")
    ] = "bwrap",
    config: Annotated[
        Path | None,
        typer.Option(help="YAML file with a runtime config (a 'runtime:' block or the config)."),
    ] = None,
    state_dir: Annotated[
        str | None, typer.Option(help="Override the runtime's state directory.")
    ] = None,
) -> None:
    """Create a sandbox, run a short bash session in it, show the timings, remove it."""
    from rock_serve.sdk.cli._demo import run_demo

    data = _runtime_config(runtime, config)
    if state_dir is not None and isinstance(data, dict):
        data = {**data, "state_dir": state_dir}
    try:
        cfg = parse_runtime_config(data)
        asyncio.run(run_demo(cfg, console))
    except RockError as exc:
        console.print(f"[red]error[/red] [bold]{exc.code.value}[/bold]: {exc.message}")
        raise typer.Exit(1) from None


API = "http://127.0.0.1:8000"
DASHBOARD = "http://127.0.0.1:8265"
ROOT = Path(__file__).resolve().parents[2]


@app.command()
def up(
    config: Annotated[Path, typer.Option(help="Serve config to deploy.")] = ROOT
    / "serve_config.yaml",
    api: Annotated[str, typer.Option(help="Where the platform's HTTP API answers.")] = API,
    dashboard: Annotated[str, typer.Option(help="Ray dashboard address.")] = DASHBOARD,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each step.")] = 300,
    ray_port: Annotated[int, typer.Option(help="GCS port of a head rock up starts.")] = 6379,
    ray_client_port: Annotated[
        int, typer.Option(help="Ray Client server port of a head rock up starts.")
    ] = 10001,
    dashboard_agent_port: Annotated[
        int, typer.Option(help="Dashboard agent HTTP port of a head rock up starts.")
    ] = 52365,
) -> None:
    """Start a local Ray head if none runs, deploy the platform, wait until it is healthy.

    A head started here listens on 127.0.0.1 only and has Ray's token auth on: the token is
    in ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN), created if missing.
    """
    from rock_serve.sdk.cli._platform import RayPorts
    from rock_serve.sdk.cli._platform import up as do_up

    ports = RayPorts(gcs=ray_port, client=ray_client_port, dashboard_agent=dashboard_agent_port)
    ends = do_up(config, api, dashboard, timeout, console, ports)
    console.print(f"API:       [bold]{ends.api}[/bold]  (OpenAPI: {ends.api}/docs)")
    console.print(f"dashboard: [bold]{ends.dashboard}[/bold]")
    if not ends.ray_auth:
        console.print("[yellow]Ray token auth is OFF on this head[/yellow]")
        return
    where = ends.ray_token_file or "$RAY_AUTH_TOKEN"
    read = f"$(cat {where})" if ends.ray_token_file else "$RAY_AUTH_TOKEN"
    console.print(
        f"  Ray token auth is on; the token is in {where} (`ray get-auth-token` prints it).\n"
        "  Browser: open the dashboard and paste the token when asked.\n"
        f'  curl -H "Authorization: Bearer {read}" {ends.dashboard}/api/jobs/\n'
        "  From another machine: ssh -L 8265:127.0.0.1:8265 <this host> (every Ray port "
        "listens on 127.0.0.1 only)."
    )
    if ends.ray_client:
        console.print(
            f"Ray Client: [bold]{ends.ray_client}[/bold]  (RAY_AUTH_MODE=token; same token)"
        )


@app.command()
def down(
    dashboard: Annotated[str, typer.Option(help="Ray dashboard address.")] = DASHBOARD,
) -> None:
    """Shut the platform down (and the Ray head, if ``rock up`` started it)."""
    from rock_serve.sdk.cli._platform import down as do_down

    raise typer.Exit(do_down(dashboard, console))


@app.command()
def status(
    api: Annotated[str, typer.Option(help="Where the platform's HTTP API answers.")] = API,
) -> None:
    """Table of Workers and sandboxes."""
    from rock_serve.sdk.cli._platform import status as do_status

    raise typer.Exit(do_status(api, console))


def main() -> None:
    """Entry point of the ``rock`` console script."""
    app()
