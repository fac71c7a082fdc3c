"""``rock env ls|show|push|rm|make|check``: the EnvHub and the env registry from the shell.

The hub is configured by ``--hub-config FILE`` (YAML of :class:`~rock_serve.envs.hub.HubConfig`)
or else by ``ROCK_HOME`` and ``ROCK_HUB_*`` variables (``ROCK_HUB_S3_BUCKET`` selects S3).
``make`` and ``check`` accept a hub name or an id of the env registry (built-in envs such as
``rock/GuessNumber-v0``); the platform is ``--url`` or ``ROCK_BASE_URL``. The hub and the env
layer are imported by the commands that use them, so ``rock --help`` stays fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rock_serve.errors import NotFound, RockError

if TYPE_CHECKING:
    from rock_serve.envs.hub import EnvHub, EnvRecord

env_app = typer.Typer(
    help="Envs: the hub (ls, show, push, rm) and running them (make, check).",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)

HubConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--hub-config",
        envvar="ROCK_HUB_CONFIG",
        help="YAML file with the hub's settings; default: ROCK_HOME and ROCK_HUB_* variables.",
        exists=True,
        dir_okay=False,
    ),
]
Version = Annotated[
    str | None, typer.Option("--version", "-v", help="Version label (default: the latest).")
]
Kwargs = Annotated[
    list[str] | None,
    typer.Option("--kwarg", "-k", help="key=value passed to make (a JSON value, else a string)."),
]
Url = Annotated[str | None, typer.Option("--url", help="Platform URL (default ROCK_BASE_URL).")]
Token = Annotated[str | None, typer.Option("--token", help="Bearer token (default ROCK_TOKEN).")]


def _fail(exc: RockError) -> typer.Exit:
    err.print(f"[red]error[/red] [bold]{exc.code.value}[/bold]: {escape(exc.message)}")
    return typer.Exit(1)


def _hub(config: Path | None) -> EnvHub:
    from rock_serve.envs.hub import EnvHub, HubConfig, parse_hub_config

    if config is None:
        return EnvHub(HubConfig.from_env())
    return EnvHub(parse_hub_config(yaml.safe_load(config.read_text()) or {}))


def _kwargs(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not key=value", param_hint="--kwarg")
        try:
            out[key] = json.loads(value)  # numbers, booleans, null, lists, objects
        except ValueError:
            out[key] = value  # anything else is a string
    return out


def _bundle(record: EnvRecord) -> str:
    if record.bundle_sha256 is None:
        return "-"
    size = f" {record.bundle_size / 1024:.1f} KiB" if record.bundle_size is not None else ""
    return record.bundle_sha256[:12] + size


def _age(pushed_at: float) -> str:
    seconds = max(0.0, time.time() - pushed_at)
    for unit, span in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


@env_app.command("ls")
def ls(
    all_versions: Annotated[bool, typer.Option("--all", help="Every version, not the latest.")] = (
        False
    ),
    registry: Annotated[
        bool, typer.Option("--registry", help="List the env registry (built-in envs) instead.")
    ] = False,
    hub_config: HubConfigFile = None,
) -> None:
    """List the hub's envs (or the registered ones)."""
    if registry:
        from rock_serve.envs import list_envs

        table = Table("id", "entry point", "max steps", "description")
        for spec in list_envs():
            entry = (
                spec.entry_point if isinstance(spec.entry_point, str) else repr(spec.entry_point)
            )
            steps = str(spec.max_episode_steps or "-")
            table.add_row(spec.id, entry, steps, spec.description.split("\n")[0][:60])
        console.print(table)
        return
    try:
        with _hub(hub_config) as hub:
            records = hub.list(all_versions=all_versions)
    except RockError as exc:
        raise _fail(exc) from None
    table = Table("name", "version", "entry point", "image", "bundle", "pushed", "description")
    for r in records:
        table.add_row(
            r.name,
            r.version,
            r.entry_point,
            r.image or "-",
            _bundle(r),
            _age(r.pushed_at),
            r.description.split("\n")[0][:50],
        )
    console.print(table)


@env_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Env name in the hub.")],
    version: Version = None,
    link: Annotated[
        bool, typer.Option("--link", help="Also print a download URL of the bundle.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
    hub_config: HubConfigFile = None,
) -> None:
    """Show one env version: its spec, bundle and other versions."""
    try:
        with _hub(hub_config) as hub:
            record = hub.get(name, version)
            versions = [r.version for r in hub.versions(name)]
            url = hub.bundle_url(name, record.version) if link else None
    except RockError as exc:
        raise _fail(exc) from None
    if as_json:
        data = record.model_dump(mode="json")
        if link:
            data["bundle_url"] = url
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows: list[tuple[str, str]] = [
        ("name", record.name),
        ("version", record.version),
        ("versions", ", ".join(versions)),
        ("entry point", record.entry_point),
        ("image", record.image or "-"),
        ("kwargs", json.dumps(record.kwargs)),
        ("max steps", str(record.max_episode_steps or "-")),
        ("bundle", record.bundle_sha256 or "-"),
        ("bundle size", str(record.bundle_size) if record.bundle_size is not None else "-"),
        ("bundle kwarg", record.bundle_kwarg or "-"),
        ("registry id", record.registry_id),
        ("description", record.description),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table, highlight=False, markup=False)
    if link:
        typer.echo(f"bundle url: {url or '-'}")  # whole, on one line: it is to be copied


@env_app.command("push")
def push(
    spec_file: Annotated[
        Path, typer.Argument(help="Spec as YAML or JSON.", exists=True, dir_okay=False)
    ],
    bundle: Annotated[
        Path | None,
        typer.Option(
            "--bundle", "-b", help="Task bundle: a directory or a tar archive.", exists=True
        ),
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Overwrite the version if it exists.")
    ] = False,
    hub_config: HubConfigFile = None,
) -> None:
    """Push an env version (and its task bundle) to the hub."""
    try:
        data = yaml.safe_load(spec_file.read_text())
    except yaml.YAMLError as exc:
        raise typer.BadParameter(f"not YAML or JSON: {exc}", param_hint="SPEC_FILE") from None
    if not isinstance(data, dict):
        raise typer.BadParameter("the spec must be a mapping", param_hint="SPEC_FILE")
    try:
        with _hub(hub_config) as hub:
            record = hub.push(data, bundle, replace=replace)
    except RockError as exc:
        raise _fail(exc) from None
    console.print(
        f"pushed [bold]{escape(record.name)}[/bold] version [bold]{escape(record.version)}[/bold] "
        f"(bundle {_bundle(record)})",
        highlight=False,
    )


@env_app.command("rm")
def rm(
    name: Annotated[str, typer.Argument(help="Env name in the hub.")],
    version: Annotated[
        str | None, typer.Option("--version", "-v", help="Only this version (default: all).")
    ] = None,
    hub_config: HubConfigFile = None,
) -> None:
    """Delete an env version (or all of them) and the bundles nothing else uses."""
    try:
        with _hub(hub_config) as hub:
            removed = hub.delete(name, version)
    except RockError as exc:
        raise _fail(exc) from None
    console.print(f"deleted {name} version(s) {', '.join(r.version for r in removed)}")


def _resolve(hub: EnvHub, name: str, version: str | None) -> str:
    """The registry id to make: the hub's env (registered here), else a registered id."""
    try:
        return hub.register(name, version)
    except NotFound:
        if version is not None:
            raise
    from rock_serve.envs import spec

    return spec(name).id  # raises EnvNotFound with suggestions


def _client_kwargs(url: str | None, token: str | None) -> dict[str, Any]:
    if url is None and token is None:
        return {}  # the env layer's default client (ROCK_BASE_URL, ROCK_TOKEN)
    from rock_serve.sdk import Client

    return {"client": Client(url, token=token)}


@env_app.command("make")
def make(
    name: Annotated[str, typer.Argument(help="Hub name or registered env id.")],
    version: Version = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the reset.")] = None,
    kwarg: Kwargs = None,
    url: Url = None,
    token: Token = None,
    hub_config: HubConfigFile = None,
) -> None:
    """Make an env, reset it once, print the first observation, close it."""
    kwargs = _kwargs(kwarg)
    extra = _client_kwargs(url, token)
    try:
        with _hub(hub_config) as hub:
            from rock_serve import envs

            rid = _resolve(hub, name, version)
            env = envs.make(rid, **kwargs, **extra)
            try:
                obs, info = env.reset(seed=seed)
            finally:
                env.close()  # type: ignore[no-untyped-call, unused-ignore]  # gymnasium 1.2
    except RockError as exc:
        raise _fail(exc) from None
    finally:
        if "client" in extra:
            extra["client"].close()
    info_text = escape(json.dumps(info, default=str))
    err.print(f"[dim]{escape(rid)}: reset(seed={seed}) -> info {info_text}[/dim]")
    typer.echo(obs if isinstance(obs, str) else repr(obs))


@env_app.command("check")
def check(
    name: Annotated[str, typer.Argument(help="Hub name or registered env id.")],
    version: Version = None,
    kwarg: Kwargs = None,
    url: Url = None,
    token: Token = None,
    hub_config: HubConfigFile = None,
) -> None:
    """Run check_env on an env (Gymnasium's checks plus ours); exit 1 if one fails."""
    kwargs = _kwargs(kwarg)
    extra = _client_kwargs(url, token)
    try:
        with _hub(hub_config) as hub:
            from rock_serve import envs

            rid = _resolve(hub, name, version)
            envs.check_env(rid, **kwargs, **extra)
    except RockError as exc:
        raise _fail(exc) from None
    except AssertionError as exc:
        err.print(f"[red]check failed[/red]: {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    finally:
        if "client" in extra:
            extra["client"].close()
    console.print(f"[green]ok[/green] {escape(rid)}", highlight=False)
