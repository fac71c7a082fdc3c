"""``rock env`` and ``EnvHub.make`` end to end: a hub on S3 (moto on loopback) and the session's
platform running the envs' sandboxes.

The env pushed here, :class:`BundleTask`, reads its task from the bundle directory that the hub
hands it (``task_dir``), so the test covers push -> S3 -> fetch and unpack -> register -> make
-> a sandbox on the platform -> close.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rock_serve.envs import EnvCore, Run, UnicodeText, WriteFiles, output_text
from rock_serve.envs.hub import AsyncEnvHub, EnvHub, HubConfig
from rock_serve.sdk import AsyncClient, Client
from rock_serve.sdk.cli import app

pytestmark = [pytest.mark.ray, pytest.mark.s3]

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")


class BundleTask(EnvCore[str, str]):
    """Answer the bundle's question with a bash command whose output is the bundle's answer."""

    observation_space = UnicodeText(4096)
    action_space = UnicodeText(1024)

    def __init__(self, *, task_dir: str, prefix: str = "Q: ") -> None:
        root = Path(task_dir)
        self.question = prefix + (root / "question.txt").read_text().strip()
        self.answer = (root / "answer.txt").read_text().strip()

    def reset(self, ctx):
        yield WriteFiles({"data/question.txt": self.question + "\n"})
        return self.question, {"task": "bundle"}

    def step(self, action, ctx):
        result = yield Run(action, timeout=10)
        out = output_text(result).strip()
        solved = out == self.answer
        return out[:4000], float(solved), solved, False, {"exit_code": result.exit_code}


SPEC = {
    "name": "acme/Bundle-v0",
    "version": "1",
    "entry_point": "tests.e2e.test_cli_env:BundleTask",
    "max_episode_steps": 5,
    "description": "a task read from its bundle",
}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def hub_env(s3_endpoint, tmp_path, monkeypatch) -> dict[str, str]:
    bucket = f"envhub-{uuid.uuid4().hex[:12]}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    env = {
        "ROCK_HOME": str(tmp_path / "home"),
        "ROCK_HUB_S3_BUCKET": bucket,
        "ROCK_HUB_S3_ENDPOINT_URL": s3_endpoint,
        "COLUMNS": "250",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the in-process hub of the API tests reads them too
    monkeypatch.delenv("ROCK_HUB_CONFIG", raising=False)
    return env


@pytest.fixture
def rock(hub_env):
    runner = CliRunner()

    def invoke(*args: str, code: int = 0):
        result = runner.invoke(app, list(args), env=hub_env)
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        return result

    return invoke


@pytest.fixture
def pushed(rock, tmp_path) -> str:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "question.txt").write_text("what is 6*7?\n")
    (tasks / "answer.txt").write_text("42\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    rock("env", "push", str(spec), "--bundle", str(tasks))
    return SPEC["name"]


def _sandboxes(api) -> list[str]:
    return [item["id"] for item in api.get("/v1/sandboxes").json()["items"]]


def test_cli_make_and_check_a_hub_env_on_s3(rock, pushed, platform, api):
    shown = rock("env", "show", pushed, "--link").stdout
    (url_line,) = [line for line in shown.splitlines() if line.startswith("bundle url: ")]
    assert "X-Amz-Signature=" in url_line  # a presigned S3 URL

    made = rock("env", "make", pushed, "--url", platform.url, "--seed", "0")
    assert made.stdout.strip() == "Q: what is 6*7?"
    made = rock("env", "make", pushed, "--url", platform.url, "-k", "prefix=Question: ")
    assert made.stdout.strip() == "Question: what is 6*7?"
    assert _sandboxes(api) == []  # make closed its env

    assert f"ok {pushed}:1" in rock("env", "check", pushed, "--url", platform.url).stdout
    assert _sandboxes(api) == []


def test_cli_make_a_registered_env_on_the_platform(rock, platform, api):
    out = rock("env", "make", "rock/GuessNumber-v0", "--url", platform.url, "--seed", "4")
    assert "between 1 and 100" in out.stdout
    assert _sandboxes(api) == []


def test_hub_make_sync_and_async(pushed, platform, api, hub_env):
    with EnvHub(HubConfig.from_env()) as hub, Client(platform.url) as client:
        env = hub.make(pushed, client=client)
        try:
            obs, info = env.reset(seed=1)
            assert (obs, info["task"]) == ("Q: what is 6*7?", "bundle")
            obs, reward, terminated, _, _ = env.step("cat data/question.txt")
            assert (obs, reward, terminated) == ("Q: what is 6*7?", 0.0, False)
            obs, reward, terminated, _, _ = env.step("echo $((6*7))")
            assert (obs, reward, terminated) == ("42", 1.0, True)
            assert len(_sandboxes(api)) == 1
        finally:
            env.close()
        assert _sandboxes(api) == []
        assert env.spec.id == f"{pushed}:1"

    async def scenario() -> None:
        async with AsyncEnvHub(HubConfig.from_env()) as hub, AsyncClient(platform.url) as client:
            env = await hub.make(pushed, client=client)
            try:
                obs, _ = await env.reset(seed=2)
                assert obs == "Q: what is 6*7?"
                _, reward, terminated, _, _ = await env.step("echo 42")
                assert (reward, terminated) == (1.0, True)
            finally:
                await env.close()

    asyncio.run(scenario())
    assert _sandboxes(api) == []


def test_a_new_version_replaces_nothing_and_is_made_by_default(rock, pushed, platform, tmp_path):
    tasks = tmp_path / "tasks2"
    tasks.mkdir()
    (tasks / "question.txt").write_text("what is 2+2?\n")
    (tasks / "answer.txt").write_text("4\n")
    spec = tmp_path / "spec2.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "version": "2"}))
    rock("env", "push", str(spec), "--bundle", str(tasks))
    assert rock("env", "make", pushed, "--url", platform.url).stdout.strip() == "Q: what is 2+2?"
    old = rock("env", "make", pushed, "-v", "1", "--url", platform.url).stdout.strip()
    assert old == "Q: what is 6*7?"
