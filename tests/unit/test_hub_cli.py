"""``rock env`` against a real hub (SQLite and a local store in tmp); no platform needed.

``make``/``check`` use the built-in guessing game in its in-memory mode, which never creates a
sandbox; the e2e tests (tests/e2e/test_cli_env.py) run sandbox envs on the platform.
"""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from rock_serve.sdk.cli import app

GAME = {
    "name": "acme/Guess-v0",
    "version": "1",
    "entry_point": "rock_serve.envs.builtin.guess_number:GuessNumber",
    "kwargs": {"high": 10, "state": "memory"},
    "max_episode_steps": 8,
    "description": "the built-in game, from the hub",
    "bundle_kwarg": None,
}


@pytest.fixture
def env(tmp_path, monkeypatch):
    home = tmp_path / "home"
    for name in ("ROCK_HUB_CONFIG", "ROCK_HUB_S3_BUCKET", "ROCK_HUB_DB", "ROCK_HUB_STORE_DIR"):
        monkeypatch.delenv(name, raising=False)
    return {"ROCK_HOME": str(home), "COLUMNS": "250"}  # wide enough for the tables


@pytest.fixture
def rock(env):
    runner = CliRunner()

    def invoke(*args: str, code: int = 0):
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        return result

    return invoke


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(GAME))
    return path


def test_push_ls_show_rm(rock, spec_file, tmp_path):
    bundle = tmp_path / "tasks"
    bundle.mkdir()
    (bundle / "levels.txt").write_text("1\n2\n")
    out = rock("env", "push", str(spec_file), "--bundle", str(bundle)).stdout
    assert "pushed acme/Guess-v0 version 1" in out
    # A JSON spec works too (JSON is YAML).
    second = tmp_path / "spec2.json"
    second.write_text(json.dumps({**GAME, "version": "2", "description": "second"}))
    rock("env", "push", str(second))

    listed = rock("env", "ls").stdout
    assert "acme/Guess-v0" in listed and "second" in listed and "first" not in listed
    assert rock("env", "ls", "--all").stdout.count("acme/Guess-v0") == 2

    shown = json.loads(rock("env", "show", "acme/Guess-v0", "--version", "1", "--json").stdout)
    assert shown["version"] == "1" and len(shown["bundle_sha256"]) == 64
    assert shown["kwargs"] == {"high": 10, "state": "memory"}
    linked = json.loads(rock("env", "show", "acme/Guess-v0", "-v", "1", "--json", "--link").stdout)
    assert linked["bundle_url"].startswith("file://")
    table = rock("env", "show", "acme/Guess-v0").stdout
    assert "2, 1" in table and "acme/Guess-v0:2" in table

    assert (
        "deleted acme/Guess-v0 version(s) 1" in rock("env", "rm", "acme/Guess-v0", "-v", "1").stdout
    )
    rock("env", "rm", "acme/Guess-v0")
    assert "acme/Guess-v0" not in rock("env", "ls").stdout


def test_errors_exit_1_with_the_code(rock, spec_file, tmp_path):
    rock("env", "push", str(spec_file))
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**GAME, "description": "other"}))
    assert "conflict" in rock("env", "push", str(changed), code=1).stderr
    rock("env", "push", str(changed), "--replace")
    assert "not_found" in rock("env", "show", "acme/Nope-v0", code=1).stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**GAME, "entry_point": "nocolon"}))
    assert "invalid_request" in rock("env", "push", str(bad), code=1).stderr
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    rock("env", "push", str(listing), code=2)  # a usage error, as typer reports them
    assert "not_found" in rock("env", "make", "acme/Nope-v0", code=1).stderr


def test_make_and_check_a_hub_env(rock, spec_file):
    rock("env", "push", str(spec_file))
    made = rock("env", "make", "acme/Guess-v0", "--seed", "3")
    assert "whole number between 1 and 10" in made.stdout
    assert "acme/Guess-v0:1" in made.stderr
    # kwargs reach the env (JSON values, else strings).
    made = rock("env", "make", "acme/Guess-v0", "-k", "high=1000", "--seed", "3")
    assert "between 1 and 1000" in made.stdout
    bad = rock("env", "make", "acme/Guess-v0", "-k", "colour=red", code=1)
    assert "invalid_request" in bad.stderr and "colour" in bad.stderr
    assert "ok acme/Guess-v0:1" in rock("env", "check", "acme/Guess-v0").stdout


def test_make_a_registered_env_by_id(rock):
    out = rock("env", "make", "rock/GuessNumber-v0", "-k", "state=memory", "--seed", "1").stdout
    assert "between 1 and 100" in out
    assert "rock/GuessNumber-v0" in rock("env", "ls", "--registry").stdout
    assert "ok" in rock("env", "check", "rock/GuessNumber-v0", "-k", "state=memory").stdout


def test_hub_config_file(rock, spec_file, tmp_path):
    config = tmp_path / "hub.yaml"
    config.write_text(
        yaml.safe_dump(
            {"db_path": str(tmp_path / "other.db"), "store": {"root": str(tmp_path / "blobs")}}
        )
    )
    rock("env", "push", str(spec_file), "--hub-config", str(config))
    assert "acme/Guess-v0" in rock("env", "ls", "--hub-config", str(config)).stdout
    assert "acme/Guess-v0" not in rock("env", "ls").stdout  # the default hub is another one
