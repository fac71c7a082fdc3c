"""`pip install rock-serve` is the SDK alone; every other stack is an extra that names itself.

The install itself is checked by importing in a child interpreter that cannot see the optional
packages (a meta-path blocker stands in for a venv without them: same import failures, no
minutes of pip).
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

from rock_serve._extras import MissingExtra, require
from rock_serve.errors import InvalidConfig

ROOT = Path(__file__).resolve().parents[2]
OPTIONAL = [
    "yaml", "typer", "rich", "websockets", "starlette", "uvicorn", "multipart", "fastapi",
    "ray", "gymnasium", "docker", "boto3", "redis", "torch",
]  # fmt: skip


def test_core_dependencies_are_the_sdk_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = sorted(d.split(">")[0].split("=")[0].strip() for d in project["dependencies"])
    assert names == ["httpx", "pydantic"]
    extras = project["optional-dependencies"]
    assert {"cli", "rocklet", "server", "docker", "envs", "state", "rllib", "dev"} <= set(extras)
    assert not any("torch" in d for d in extras["server"]), "the platform lane must not pull torch"


def test_require_names_the_extra():
    with pytest.raises(MissingExtra, match=r"pip install 'rock-serve\[docker\]'") as info:
        require("rock_serve_no_such_module", "docker", "the docker runtime")
    assert isinstance(info.value, InvalidConfig)
    assert isinstance(info.value, ImportError)
    assert require("json", "cli") is json


def _without_extras(code: str) -> subprocess.CompletedProcess[str]:
    prelude = textwrap.dedent(
        f"""
        import sys
        BLOCKED = {OPTIONAL!r}
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None
        sys.meta_path.insert(0, Block())
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_sdk_imports_and_works_without_any_extra():
    done = _without_extras(
        """
        import json
        from rock_serve.sdk import AsyncClient, Client
        from rock_serve.protocol import SandboxSpec, ExecRequest
        from rock_serve.errors import from_body
        client = Client(base_url="http://127.0.0.1:9")
        client.close()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps(loaded))
        """
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_a_missing_extra_is_a_typed_error_naming_it():
    done = _without_extras(
        """
        from rock_serve._extras import MissingExtra
        from rock_serve.config import DockerRuntimeConfig
        try:
            DockerRuntimeConfig().build()
        except MissingExtra as exc:
            print("typed:", exc)
        """
    )
    assert done.returncode == 0, done.stderr
    assert "typed:" in done.stdout and "rock-serve[docker]" in done.stdout


def test_the_cli_without_its_extra_says_which_to_install():
    done = _without_extras("from rock_serve.sdk.cli import main\nmain()\n")
    assert done.returncode == 2
    assert "pip install 'rock-serve[cli]'" in done.stderr
    assert "Traceback" not in done.stderr
