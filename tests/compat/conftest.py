"""The compatibility APIs driven by each peer's own client package, unmodified.

Every client lives in its own venv under ``.clients/<name>`` (``scripts/client-venvs``), so its
pins never touch ours. A test runs a small driver script (``drivers/``) with that venv's
interpreter against one platform deployed for the whole session on a separate Ray head
(``tests/e2e/_head.py``: `ray start --head` + `serve deploy` of serve_config.yaml on the local
runtime, with tokens): the client's code calls ours over HTTP, and the driver prints JSON that
the test asserts on. A missing venv skips, except with ``ROCK_REQUIRE_CLIENTS=1`` (CI), where it
fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from rock_serve.auth import generate_token, hash_token
from tests.e2e._head import BIN, Head, deploy, ray_head

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / ".clients"
DRIVERS = Path(__file__).parent / "drivers"
NAMESPACE = "rock-compat"
#: (user, platform namespace) of the tokens the deployed app accepts.
USERS = [("alice", "team-a"), ("bob", "team-b")]
#: Namespace whose GEM routes take callers without a token.
PUBLIC = "gem-public"
#: The deployed app's max_file_bytes (small, so oversized uploads are cheap to send).
MAX_FILE_BYTES = 1 << 20


@dataclass
class CompatPlatform:
    url: str
    tokens: dict[str, str]
    head: Head
    audit: Path

    def client(self, user: str | None = "alice") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def client_python(name: str) -> str:
    """The interpreter of client venv ``name``; skip (or fail under ROCK_REQUIRE_CLIENTS=1)."""
    python = CLIENTS / name / "bin" / "python"
    if not python.exists():
        reason = f"client venv .clients/{name} is missing: run scripts/client-venvs {name}"
        if os.environ.get("ROCK_REQUIRE_CLIENTS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return str(python)


def run_driver(
    client: str,
    driver: str,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> Any:
    """Run ``drivers/<driver>`` in client venv ``client``; its last stdout line, as JSON."""
    python = client_python(client)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    full_env.update(env or {})
    proc = subprocess.run(
        [python, str(DRIVERS / driver), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=str(DRIVERS),
        check=False,
    )
    assert proc.returncode == 0, f"{driver} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"{driver} printed nothing:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="session")
def compat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CompatPlatform]:
    """One platform for the session: tokens for USERS, anonymous GEM in PUBLIC, an audit log."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray CLI is not installed")
    tmp = tmp_path_factory.mktemp("compat")
    tokens = {user: generate_token() for user, _ in USERS}

    def edit(app: dict[str, Any]) -> None:
        app["args"]["auth"] = {
            "tokens": [
                {"name": user, "namespace": ns, "sha256": hash_token(tokens[user])}
                for user, ns in USERS
            ],
            "anonymous": {PUBLIC: ["gem"]},
        }
        app["args"]["max_sandboxes_per_node"] = 32
        app["args"]["max_file_bytes"] = MAX_FILE_BYTES
        app["args"]["reap_interval_seconds"] = 0.5

    with ray_head() as head:
        deploy(head, tmp, NAMESPACE, edit)
        yield CompatPlatform(
            url=head.url, tokens=tokens, head=head, audit=tmp / "audit-state.jsonl"
        )
