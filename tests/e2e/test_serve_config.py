"""serve_config.yaml and the configs/ presets parse into what Serve and ServerArgs expect."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rock_serve.config import BwrapRuntimeConfig, ServerArgs, parse_server_args
from rock_serve.errors import InvalidConfig

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_is_a_valid_serve_deploy_file():
    schema = pytest.importorskip("ray.serve.schema")
    data = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config = schema.ServeDeploySchema.model_validate(data)
    (app,) = config.applications
    assert app.import_path == "rock_serve.deployments.app:build_app"
    (admin,) = app.deployments
    assert admin.name == "Admin"
    assert admin.ray_actor_options.num_cpus == 0
    args = parse_server_args(app.args)
    assert isinstance(args.runtime, BwrapRuntimeConfig)
    assert args.runtime.state_dir == "/var/lib/rock-serve/bwrap"


#: Serve presets: every YAML in configs/ but the Prometheus alert rules (not a serve config).
PRESETS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.stem != "alerts")


def test_the_presets_are_there():
    assert {p.stem for p in PRESETS} >= {"bwrap", "local", "docker", "cluster"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_are_serve_deploy_files(preset):
    """Each preset deploys as is: ``serve deploy configs/<name>.yaml``."""
    schema = pytest.importorskip("ray.serve.schema")
    config = schema.ServeDeploySchema.model_validate(yaml.safe_load(preset.read_text()))
    (app,) = config.applications
    assert app.import_path == "rock_serve.deployments.app:build_app"
    (admin,) = app.deployments
    assert admin.name == "Admin" and admin.ray_actor_options.num_cpus == 0
    args = parse_server_args(app.args)
    assert isinstance(args, ServerArgs)
    assert args.runtime.type == (preset.stem if preset.stem != "cluster" else "bwrap")


def test_bad_server_args_are_typed_errors():
    with pytest.raises(InvalidConfig, match="max_sandboxes_per_node"):
        parse_server_args({"max_sandboxes_per_node": 0})
    with pytest.raises(InvalidConfig, match="bogus"):
        parse_server_args({"bogus": 1})
    with pytest.raises(InvalidConfig, match="default_ttl_seconds"):
        parse_server_args({"default_ttl_seconds": 10, "max_ttl_seconds": 5})
