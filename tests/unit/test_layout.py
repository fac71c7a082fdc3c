"""The public surface and the dependency direction are part of the contract."""

import ast
from pathlib import Path

import pytest

import rock_serve
import rock_serve.errors
import rock_serve.protocol
import rock_serve.rocklet

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (rock_serve.rocklet, {"AGENT_PATH", "RockletHandle", "agent_argv", "install_agent"}),
        (rock_serve, {"__version__"}),
    ],
)
def test_exported_members(module, expected):
    assert set(module.__all__) == expected
    for name in module.__all__:
        assert hasattr(module, name)


def test_protocol_and_errors_export_what_they_define():
    for module in (rock_serve.protocol, rock_serve.errors):
        for name in module.__all__:
            assert hasattr(module, name), name


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_only_deployments_import_ray():
    offenders = []
    for folder in ("rock_serve", "sdk", "envs"):
        for path in (ROOT / folder).rglob("*.py"):
            if any(name == "ray" or name.startswith("ray.") for name in _imports(path)):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_agent_uses_the_standard_library_only():
    import sys

    agent = ROOT / "rock_serve" / "rocklet" / "agent.py"
    third_party = [
        name
        for name in _imports(agent)
        if name.split(".")[0] not in sys.stdlib_module_names and name != "__future__"
    ]
    assert third_party == []


def test_packages_install_under_the_rock_serve_namespace():
    import rock_serve.deployments
    import rock_serve.envs
    import rock_serve.sdk

    assert Path(rock_serve.sdk.__file__).parent == ROOT / "sdk"
    assert Path(rock_serve.envs.__file__).parent == ROOT / "envs"
    assert Path(rock_serve.deployments.__file__).parent == ROOT / "deployments"
