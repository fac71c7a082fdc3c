"""Tokens, verification, token files, credentials, namespace checks and the audit log (no Ray)."""

from __future__ import annotations

import hmac
import json
import os
import stat
import time

import pytest
from typer.testing import CliRunner

from rock_serve import auth
from rock_serve.auth import (
    ANONYMOUS,
    Authenticator,
    Principal,
    TokenTable,
    bearer_token,
    generate_token,
    hash_token,
    load_token_file,
    read_credentials,
    save_token_file,
    write_credentials,
)
from rock_serve.config import AuditConfig, AuthConfig, TokenEntry, parse_server_args
from rock_serve.deployments._audit import AuditEvent, AuditLog
from rock_serve.deployments._auth import NamespaceGuard
from rock_serve.errors import InvalidConfig, PermissionDenied, SandboxNotFound, Unauthorized
from rock_serve.protocol import SandboxRecord
from rock_serve.sdk import ClientSettings


def _entry(name, token, namespace="default", admin=False):
    return TokenEntry(name=name, namespace=namespace, sha256=hash_token(token), admin=admin)


# Tokens and verification ---------------------------------------------------------------------


def test_tokens_are_random_and_hashed_as_sha256_hex():
    a, b = generate_token(), generate_token()
    assert a != b
    assert a.startswith("rk_")
    assert len(a) >= 40
    assert hash_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_verify_finds_the_entry_and_compares_against_every_one(monkeypatch):
    tokens = [generate_token() for _ in range(5)]
    table = TokenTable(
        [_entry(f"t{i}", tok, namespace=f"ns{i}", admin=i == 0) for i, tok in enumerate(tokens)]
    )
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert table.verify(tokens[0]) == Principal("t0", "ns0", admin=True)
    assert len(calls) == 5  # no early exit on the first (matching) entry
    calls.clear()
    assert table.verify(tokens[3]) == Principal("t3", "ns3")
    assert table.verify("rk_wrong") is None
    assert table.verify("") is None
    assert len(calls) == 15


def test_duplicate_names_or_tokens_are_refused():
    with pytest.raises(InvalidConfig, match="duplicate token names: a"):
        TokenTable([_entry("a", "x"), _entry("a", "y")])
    with pytest.raises(InvalidConfig, match="same sha256"):
        TokenTable([_entry("a", "x"), _entry("b", "x")])


def test_entries_are_validated():
    with pytest.raises(ValueError, match="sha256"):
        TokenEntry(name="a", sha256="not-hex")
    with pytest.raises(ValueError, match="namespace"):
        TokenEntry(name="a", namespace="../etc", sha256=hash_token("x"))


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer  ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_header_parsing(header, token):
    assert bearer_token(header) == token


# Policy --------------------------------------------------------------------------------------


def test_mode_defaults_to_required_when_tokens_are_configured(tmp_path):
    assert not AuthConfig().required
    assert AuthConfig(tokens=[_entry("a", "x")]).required
    assert AuthConfig(token_file=str(tmp_path / "t.yaml")).required
    assert not AuthConfig(mode="disabled", tokens=[_entry("a", "x")]).required
    with pytest.raises(ValueError, match="neither tokens nor token_file"):
        AuthConfig(mode="required")
    args = parse_server_args({"auth": {"tokens": [_entry("a", "x").model_dump()]}})
    assert args.auth.required


def test_disabled_auth_makes_everyone_an_admin_of_default():
    authenticator = Authenticator(AuthConfig())
    assert authenticator.authenticate(None) is ANONYMOUS
    assert authenticator.authenticate("anything") is ANONYMOUS
    assert ANONYMOUS == Principal("anonymous", "default", admin=True)


def test_required_auth_refuses_missing_and_unknown_tokens():
    token = generate_token()
    authenticator = Authenticator(AuthConfig(tokens=[_entry("alice", token, "team-a")]))
    with pytest.raises(Unauthorized, match="required"):
        authenticator.authenticate(None)
    with pytest.raises(Unauthorized, match="not valid"):
        authenticator.authenticate(token + "x")
    assert authenticator.authenticate(token) == Principal("alice", "team-a")


def test_token_file_is_loaded_and_reloaded_when_it_changes(tmp_path):
    path = tmp_path / "tokens.yaml"
    first, second = generate_token(), generate_token()
    save_token_file(path, [_entry("first", first)])
    now = [0.0]
    authenticator = Authenticator(AuthConfig(token_file=str(path)), clock=lambda: now[0])
    assert authenticator.authenticate(first).name == "first"

    save_token_file(path, [_entry("second", second)])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a distinct mtime
    with pytest.raises(Unauthorized):  # checked at most every 2 s
        authenticator.authenticate(second)
    now[0] = 3.0
    assert authenticator.authenticate(second).name == "second"
    with pytest.raises(Unauthorized):  # revoked
        authenticator.authenticate(first)

    path.write_text("tokens: [{name: broken}]")  # a bad edit keeps the last good table
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    now[0] = 6.0
    assert authenticator.authenticate(second).name == "second"


def test_a_missing_token_file_fails_start_up(tmp_path):
    with pytest.raises(InvalidConfig, match="rock up"):
        Authenticator(AuthConfig(token_file=str(tmp_path / "absent.yaml")))


def test_token_files_are_private_and_take_lists_or_json(tmp_path):
    path = tmp_path / "d" / "tokens.yaml"
    save_token_file(path, [_entry("a", "x", admin=True)])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "x" not in path.read_text().replace(hash_token("x"), "")
    assert load_token_file(path) == [_entry("a", "x", admin=True)]
    as_json = tmp_path / "tokens.json"
    as_json.write_text(json.dumps([_entry("b", "y").model_dump()]))
    assert load_token_file(as_json) == [_entry("b", "y")]
    as_json.write_text(json.dumps({"tokens": [{"name": "c", "sha256": "00"}]}))
    with pytest.raises(InvalidConfig, match=r"0\.sha256"):
        load_token_file(as_json)


# Credentials (SDK side) ----------------------------------------------------------------------


def test_credentials_are_per_url_and_private(tmp_path):
    path = tmp_path / "rock" / "credentials"
    write_credentials(path, "http://a:1/", "tok-a")
    write_credentials(path, "http://b:2", "tok-b")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_credentials(path, "http://a:1") == "tok-a"
    assert read_credentials(path, "http://b:2/") == "tok-b"
    assert read_credentials(path, "http://c:3") is None
    assert read_credentials(tmp_path / "absent", "http://a:1") is None


def test_sdk_settings_fall_back_to_the_credentials_file(tmp_path):
    path = tmp_path / "credentials"
    write_credentials(path, "http://h:1", "saved")
    env = {"ROCK_CREDENTIALS": str(path), "ROCK_BASE_URL": "http://h:1"}
    assert ClientSettings.from_env(env).token == "saved"
    assert ClientSettings.from_env({**env, "ROCK_TOKEN": "env"}).token == "env"
    assert ClientSettings.from_env(env, token="").token is None  # explicitly none
    assert ClientSettings.from_env(env, base_url="http://other:1").token is None
    assert ClientSettings.from_env({"ROCK_BASE_URL": "http://h:1"}).token is None  # hermetic


def test_token_cli_creates_hashed_entries(tmp_path, monkeypatch):
    from rock_serve.sdk.cli._app import app

    monkeypatch.setenv("ROCK_CREDENTIALS", str(tmp_path / "credentials"))
    file = tmp_path / "tokens.yaml"
    runner = CliRunner()
    args = ["token", "create", "--name", "ci", "--namespace", "team-b", "--file", str(file)]
    result = runner.invoke(app, [*args, "--save-for", "http://h:1"])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("rk_")
    assert token not in file.read_text()
    assert load_token_file(file) == [_entry("ci", token, "team-b")]
    assert read_credentials(tmp_path / "credentials", "http://h:1") == token
    assert runner.invoke(app, args).exit_code == 1  # the name is taken
    hashed = runner.invoke(app, ["token", "hash"], input=token + "\n")
    assert hashed.stdout.strip() == hash_token(token)


# Namespace checks (the Admin's per-replica cache) --------------------------------------------


def _record(sandbox_id, namespace):
    return SandboxRecord(
        id=sandbox_id,
        state="running",
        worker="w",
        node_id="n",
        created_at=0.0,
        namespace=namespace,
    )


class _Registry:
    """Stands in for the Scheduler's ``get`` (the injected seam), counting lookups."""

    def __init__(self, records):
        self.records = {r.id: r for r in records}
        self.lookups = 0

    async def get(self, sandbox_id):
        self.lookups += 1
        if sandbox_id not in self.records:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r} (unknown, deleted or expired)")
        return self.records[sandbox_id]


async def test_other_namespaces_look_exactly_like_unknown_sandboxes():
    registry = _Registry([_record("sb-w-1", "team-a"), _record("sb-w-2", "team-b")])
    guard = NamespaceGuard(registry.get)
    alice = Principal("alice", "team-a")
    await guard.check(alice, "sb-w-1")
    with pytest.raises(SandboxNotFound) as other:
        await guard.check(alice, "sb-w-2")
    with pytest.raises(SandboxNotFound) as unknown:
        await guard.check(alice, "sb-w-3")
    assert str(other.value) == "no sandbox 'sb-w-2'"
    assert str(unknown.value) == "no sandbox 'sb-w-3'"
    root = Principal("root", "default", admin=True)
    lookups = registry.lookups
    await guard.check(root, "sb-w-2")
    await guard.check(root, "sb-w-3")  # admins pass without a lookup (the call itself 404s)
    assert registry.lookups == lookups


async def test_the_namespace_is_looked_up_once_per_sandbox():
    registry = _Registry([_record("sb-w-1", "team-a")])
    guard = NamespaceGuard(registry.get)
    alice = Principal("alice", "team-a")
    for _ in range(100):
        await guard.check(alice, "sb-w-1")
    assert registry.lookups == 1
    guard.remember("sb-w-9", "team-a")  # as the Admin does at create
    await guard.check(alice, "sb-w-9")
    assert registry.lookups == 1


async def test_a_warm_check_costs_microseconds():
    registry = _Registry([_record("sb-w-1", "team-a")])
    guard = NamespaceGuard(registry.get)
    alice = Principal("alice", "team-a")
    await guard.check(alice, "sb-w-1")
    n = 20_000
    started = time.perf_counter()
    for _ in range(n):
        await guard.check(alice, "sb-w-1")
    per_call = (time.perf_counter() - started) / n
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} us per check"


def test_list_filters():
    alice, root = Principal("alice", "team-a"), Principal("root", "ops", admin=True)
    assert NamespaceGuard.check_namespace_filter(alice, None) == "team-a"
    assert NamespaceGuard.check_namespace_filter(alice, "team-a") == "team-a"
    with pytest.raises(PermissionDenied):
        NamespaceGuard.check_namespace_filter(alice, "team-b")
    assert NamespaceGuard.check_namespace_filter(root, None) is None
    assert NamespaceGuard.check_namespace_filter(root, "team-b") == "team-b"


# Audit log -----------------------------------------------------------------------------------


def _event(**kw):
    base = {"action": "exec", "token_name": "alice", "namespace": "team-a", "status": 200}
    return AuditEvent(**{**base, "code": "ok", **kw})


async def test_jsonl_sink_appends_one_flushed_line_per_event(tmp_path):
    path = tmp_path / "audit" / "audit.jsonl"
    audit = AuditLog(AuditConfig(path=str(path)))
    audit.record(_event(sandbox_id="sb-w-1", command="echo hi", env_keys=["SECRET"]))
    audit.record(_event(action="delete", status=204))
    await audit.flush()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["action"] for e in lines] == ["exec", "delete"]
    assert lines[0]["command"] == "echo hi"
    assert lines[0]["env_keys"] == ["SECRET"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.rename(tmp_path / "audit" / "rotated.jsonl")  # logrotate: the next line starts anew
    audit.record(_event(action="create", status=201))
    await audit.aclose()
    assert [json.loads(x)["action"] for x in path.read_text().splitlines()] == ["create"]


async def test_a_failing_sink_never_fails_the_caller(tmp_path):
    errors = []
    (tmp_path / "dir.jsonl").mkdir()  # cannot be opened for writing
    audit = AuditLog(
        AuditConfig(path=str(tmp_path / "dir.jsonl")), on_error=lambda s, n: errors.append((s, n))
    )
    audit.record(_event())
    audit.record(_event())
    await audit.flush()
    assert audit.failures == {"file": 2}
    assert sum(n for _, n in errors) == 2
    await audit.aclose()


async def test_a_full_queue_drops_and_counts(tmp_path):
    audit = AuditLog(AuditConfig(path=str(tmp_path / "a.jsonl"), queue_size=2))
    for _ in range(5):
        audit.record(_event())  # no await between: the drain task has not run yet
    assert audit.failures == {"queue": 3}
    await audit.aclose()
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 2


def test_commands_are_cut_and_stream_fields_are_flat_strings():
    audit = AuditLog(AuditConfig(max_command_chars=16))
    assert audit.command("x" * 40) == "x" * 16 + "...[cut]"
    assert audit.command(["a" * 10, "b" * 10, "c"]) == ["a" * 10, "b" * 6 + "...[cut]"]
    fields = _event(env_keys=["K"], detail={"exit_code": 0}).stream_fields()
    assert all(isinstance(v, str) for v in fields.values())
    assert json.loads(fields["env_keys"]) == ["K"]
    assert json.loads(fields["detail"]) == {"exit_code": 0}
    assert fields["status"] == "200"
    assert "sandbox_id" not in fields  # None fields are left out


def test_audit_without_sinks_is_a_no_op():
    audit = AuditLog(AuditConfig())
    assert not audit.enabled
    audit.record(_event())  # no loop needed, nothing queued
    assert audit.failures == {}


def test_rock_up_makes_or_keeps_an_admin_token(tmp_path, monkeypatch):
    from rock_serve.sdk.cli._platform import ensure_admin_token

    monkeypatch.setenv("ROCK_CREDENTIALS", str(tmp_path / "credentials"))
    token_file = tmp_path / "tokens.yaml"
    api = "http://127.0.0.1:8000"
    assert ensure_admin_token(token_file, api) == "admin"
    token = read_credentials(tmp_path / "credentials", api)
    assert TokenTable(load_token_file(token_file)).verify(token) == Principal(
        "admin", "default", admin=True
    )
    assert ensure_admin_token(token_file, api) is None  # the saved token still works
    write_credentials(tmp_path / "credentials", api, "rk_lost")  # e.g. another machine's
    added = ensure_admin_token(token_file, api)
    assert added is not None and added.startswith("admin-")
    assert [e.name for e in load_token_file(token_file)] == ["admin", added]
