"""`rock up` with serve_config.yaml's auth on: it makes the token file and the SDK's credentials.

On a separate `ray start --head` (see _head.py). The YAML is serve_config.yaml with the local
runtime, a free port, its own namespace, and the token file, audit log and credentials in a
temp dir; `auth` and `audit` are otherwise as shipped.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from rock_serve.auth import load_token_file, read_credentials
from rock_serve.sdk import Client

from ._head import ROOT, Head, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _rock(head: Head, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rock_serve.sdk.cli", *args],
        env={**head.env, **env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_rock_up_bootstraps_an_admin_token(ray_head, tmp_path, monkeypatch):
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    shipped = app["args"]
    assert shipped["auth"]["token_file"] == "~/.rock/tokens.yaml"
    assert config["http_options"]["host"] == "127.0.0.1"
    config["http_options"] = {"host": "127.0.0.1", "port": ray_head.http_port}
    config.pop("grpc_options", None)
    shipped["runtime"] = {"type": "local", "state_dir": str(tmp_path / "state")}
    shipped["namespace"] = "rock-e2e-auth-deploy"
    token_file = tmp_path / "home" / "tokens.yaml"
    shipped["auth"]["token_file"] = str(token_file)
    shipped["audit"]["path"] = str(tmp_path / "home" / "audit.jsonl")
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    credentials = tmp_path / "home" / "credentials"
    env = {
        "ROCK_CREDENTIALS": str(credentials),
        "ROCK_STATE_FILE": str(tmp_path / "platform.json"),
    }
    env_token = os.environ.get("ROCK_TOKEN")
    assert env_token is None, "ROCK_TOKEN would bypass the credentials file"
    api = ray_head.url
    args = ("--config", str(path), "--api", api, "--dashboard", ray_head.dashboard)
    # Until the head's dashboard answers, `rock up` would start a head of its own.
    wait_for(
        lambda: httpx.get(f"{ray_head.dashboard}/api/version", timeout=5).status_code == 200,
        time.monotonic() + 60,
        "the dashboard",
    )
    env["ROCK_RAY_TEMP_DIR"] = str(tmp_path / "never-used")

    up = _rock(ray_head, env, "up", *args, "--timeout", "240")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "admin token 'admin' saved" in up.stdout
    for private in (token_file, credentials):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    token = read_credentials(credentials, api)
    assert token is not None
    assert token not in token_file.read_text()
    (entry,) = load_token_file(token_file)
    assert (entry.name, entry.namespace, entry.admin) == ("admin", "default", True)

    # Anonymous callers are refused; the SDK finds the token in the credentials file.
    assert httpx.post(f"{api}/v1/sandboxes", json={}).status_code == 401
    monkeypatch.setenv("ROCK_CREDENTIALS", str(credentials))
    monkeypatch.delenv("ROCK_TOKEN", raising=False)
    with Client(api) as client:
        with client.sandbox(ttl_seconds=120) as sb:
            assert sb.run("echo with-auth").output == "with-auth\n"
            status = _rock(ray_head, env, "status", "--api", api)
            assert status.returncode == 0, status.stdout + status.stderr
            assert sb.id in status.stdout
        kept = client.create_sandbox(ttl_seconds=120)

    # A second `rock up` keeps the working token.
    again = _rock(ray_head, env, "up", *args, "--timeout", "240")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "saved" not in again.stdout
    assert read_credentials(credentials, api) == token

    down = _rock(ray_head, env, "down", "--dashboard", ray_head.dashboard)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "removed 1 sandbox(es)" in down.stdout
    assert not any((tmp_path / "state").iterdir())
    actions = [
        json.loads(x)["action"] for x in Path(shipped["audit"]["path"]).read_text().splitlines()
    ]
    assert actions.count("create") == 2
    assert kept.id
