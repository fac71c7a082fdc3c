"""The env layer without a platform: registry, make, wrappers, checkers, vector envs, groups.

The envs here use no sandbox (in-test cores with ``uses_sandbox = False`` and GuessNumber with
``state="memory"``), so the whole driver and wrapper stack runs for real with no platform and
no Ray. Sandbox-backed behaviour is covered by tests/e2e/test_envs.py.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import gymnasium
import numpy as np
import pytest
from gymnasium.spaces import Discrete

import rock_serve.envs as envs
import rock_serve.envs.vector
from rock_serve.envs import (
    AsyncEnv,
    AsyncOrderEnforcing,
    AsyncSandboxEnv,
    AsyncTimeLimit,
    EnvClosed,
    EnvCore,
    EnvExists,
    EnvNotFound,
    EpisodeOver,
    InvalidAction,
    InvalidEnvKwargs,
    OrderEnforcing,
    ResetNeeded,
    SandboxEnv,
    UnicodeText,
)
from rock_serve.errors import Conflict, InvalidRequest, NotFound
from rock_serve.sdk import AsyncClient, Client


class Echo(EnvCore[str, str]):
    """Echoes actions; terminates on 'stop'; records its kwargs."""

    uses_sandbox = False
    made: list[dict[str, Any]] = []

    def __init__(self, *, prefix: str = "", fail_on_seed: int | None = None) -> None:
        self.prefix = prefix
        self.fail_on_seed = fail_on_seed
        self.observation_space = UnicodeText(256)
        self.action_space = UnicodeText(64)
        Echo.made.append({"prefix": prefix, "fail_on_seed": fail_on_seed})

    def reset(self, ctx):
        if ctx.seed is not None and ctx.seed == self.fail_on_seed:
            raise InvalidRequest("refusing this seed")
        yield from ()
        return f"{self.prefix}start {int(ctx.np_random.integers(1000))}", {"seed": ctx.seed}

    def step(self, action, ctx):
        yield from ()
        return f"{self.prefix}{action}", float(len(action)), action == "stop", False, {}


class Plain(gymnasium.Env[int, int]):
    """A plain Gymnasium env (no core): make() takes it as is."""

    observation_space = Discrete(3)
    action_space = Discrete(2)

    def __init__(self, size: int = 3) -> None:
        self.size = size

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return 0, {}

    def step(self, action):
        return 1, 0.0, True, False, {}


class PlainAsync(AsyncEnv[str, str]):
    observation_space = UnicodeText(16)
    action_space = UnicodeText(16)

    async def reset(self, *, seed=None, options=None):
        await super().reset(seed=seed)
        return "ready", {}

    async def step(self, action):
        return action, 1.0, True, False, {}


@pytest.fixture
def registered():
    """Register in-test envs under unique ids; unregister them afterwards."""
    ids: list[str] = []

    def add(id: str, entry_point: Any, **kwargs: Any) -> str:
        envs.register(id, entry_point, **kwargs)
        ids.append(id)
        return id

    Echo.made.clear()
    yield add
    for id in ids:
        envs.unregister(id)


# ---------------------------------------------------------------------------------------------
# Public surface


def test_exported_members():
    expected = {
        "AsyncEnv", "AsyncEnvGroup", "AsyncOrderEnforcing", "AsyncSandboxEnv", "AsyncTimeLimit",
        "AsyncVectorEnv", "AsyncWrapper", "Env", "EnvClosed", "EnvCore", "EnvExists",
        "EnvNotFound", "EnvSpec", "EpisodeContext", "EpisodeOver", "Exec", "InvalidAction",
        "InvalidEnvKwargs", "LLMPoll", "LLMRespond", "Op", "OrderEnforcing", "ReadFile",
        "ResetNeeded", "Run", "SandboxEnv", "UnicodeText", "WriteFiles", "check_async_env",
        "check_env", "list_envs", "make", "make_async", "make_group", "make_vec", "output_text",
        "register", "spec", "unregister",
    }  # fmt: skip
    assert set(envs.__all__) == expected
    assert set(rock_serve.envs.vector.__all__) == {
        "AsyncEnvGroup", "AsyncVectorEnv", "AutoresetMode", "make_group", "make_vec",
    }  # fmt: skip
    for module in (envs, rock_serve.envs.vector):
        for name in module.__all__:
            assert hasattr(module, name), name
    assert envs.Env is gymnasium.Env


def test_errors_are_typed_and_keep_their_builtin_meaning():
    assert issubclass(EnvNotFound, NotFound) and issubclass(EnvNotFound, LookupError)
    assert issubclass(InvalidEnvKwargs, InvalidRequest) and issubclass(InvalidEnvKwargs, ValueError)
    assert issubclass(InvalidAction, InvalidRequest)
    assert issubclass(EnvExists, Conflict)
    assert issubclass(EpisodeOver, ResetNeeded) and issubclass(ResetNeeded, Conflict)
    # Code written against Gymnasium catches ours too.
    assert issubclass(ResetNeeded, gymnasium.error.ResetNeeded)
    assert issubclass(EnvClosed, Conflict)


def test_builtin_envs_are_registered():
    ids = [s.id for s in envs.list_envs()]
    assert {"rock/Terminal-v0", "rock/CodeExec-v0", "rock/GuessNumber-v0"} <= set(ids)
    assert ids == sorted(ids)
    assert {s.id for s in envs.list_envs(namespace="rock")} >= {"rock/Terminal-v0"}
    terminal = envs.spec("rock/Terminal-v0")
    assert terminal.max_episode_steps == 30
    assert (terminal.namespace, terminal.name, terminal.version) == ("rock", "Terminal", 0)
    assert terminal.description
    assert isinstance(terminal, envs.EnvSpec)


# ---------------------------------------------------------------------------------------------
# Registry


def test_register_spec_and_unregister(registered):
    id = registered(
        "test/Echo-v3",
        Echo,
        max_episode_steps=5,
        kwargs={"prefix": "> "},
        description="echo",
        image="python:3.12",
        shared_sandbox=True,
        tags=["demo"],
    )
    found = envs.spec(id)
    assert found.version == 3
    assert (found.max_episode_steps, found.kwargs, found.image) == (
        5,
        {"prefix": "> "},
        "python:3.12",
    )
    assert found.shared_sandbox is True
    assert found.metadata == {"tags": ["demo"]}
    other = envs.register("test/Meta-v0", Echo, metadata={"a": 1}, b=2)
    assert other.metadata == {"a": 1, "b": 2}
    envs.unregister("test/Meta-v0")
    with pytest.raises(EnvExists):
        envs.register(id, Echo)
    envs.register(id, Echo, replace=True)
    assert envs.spec(id).kwargs == {}


def test_bad_specs_are_refused():
    with pytest.raises(InvalidRequest):
        envs.register("not a valid id!", Echo)
    with pytest.raises(InvalidRequest):
        envs.register("test/Bad-v1", Echo, version=2)
    with pytest.raises(InvalidRequest):
        envs.register("test/Bad-v1", Echo, max_episode_steps=0)
    with pytest.raises(EnvNotFound):
        envs.unregister("test/Never-v0")


def test_unknown_id_suggests_close_ones():
    with pytest.raises(EnvNotFound) as err:
        envs.make("rock/Terminl-v0")
    assert err.value.details["suggestions"][0] == "rock/Terminal-v0"
    assert "did you mean 'rock/Terminal-v0'" in str(err.value)
    # Same name, other version or no namespace.
    with pytest.raises(EnvNotFound) as err:
        envs.make("Terminal-v1")
    assert "rock/Terminal-v0" in err.value.details["suggestions"]
    with pytest.raises(EnvNotFound) as err:
        envs.make_async("zzz/Nothing-v9")
    assert err.value.details["suggestions"] == []
    with pytest.raises(InvalidRequest):
        envs.make(42)  # type: ignore[arg-type]


def test_make_kwargs_reach_the_env_over_spec_kwargs(registered):
    id = registered("test/Echo-v0", Echo, kwargs={"prefix": "spec:"})
    with envs.make(id) as env:
        assert env.reset(seed=1)[0].startswith("spec:start")
    with envs.make(id, prefix="mine:") as env:
        assert env.reset(seed=1)[0].startswith("mine:start")
        assert env.step("hi")[0] == "mine:hi"
    assert Echo.made == [
        {"prefix": "spec:", "fail_on_seed": None},
        {"prefix": "mine:", "fail_on_seed": None},
    ]
    # The made env's Gymnasium spec records them (and can make the env again).
    with envs.make(id, prefix="again:") as env:
        assert env.spec is not None and env.unwrapped.spec.kwargs == {"prefix": "again:"}
        remade = env.unwrapped.spec.make()
        assert isinstance(remade.unwrapped, SandboxEnv)
        assert remade.unwrapped.core.prefix == "again:"
        remade.close()


def test_bad_kwargs_list_the_valid_ones(registered):
    id = registered("test/Echo-v0", Echo)
    with pytest.raises(InvalidEnvKwargs) as err:
        envs.make(id, prefx="x")
    assert err.value.details["unexpected"] == ["prefx"]
    assert {"prefix", "fail_on_seed", "client", "sandbox", "max_episode_steps"} <= set(
        err.value.details["valid"]
    )
    assert "did you mean 'prefix'" in str(err.value)
    with pytest.raises(InvalidEnvKwargs):
        envs.make_async(id, nope=1)
    with pytest.raises(InvalidEnvKwargs):
        envs.make(id, max_episode_steps=0)
    with pytest.raises(InvalidEnvKwargs):
        envs.make("rock/Terminal-v0", famly="fix_test")
    # Values are checked by the env itself, with typed errors too.
    with pytest.raises(InvalidRequest, match="families"):
        envs.make("rock/Terminal-v0", family="nope")
    with pytest.raises(InvalidRequest):
        envs.make("rock/GuessNumber-v0", high=0)
    with pytest.raises(InvalidRequest):
        envs.make("rock/GuessNumber-v0", state="memory", on_sandbox_error="ignore")


def test_sync_and_async_clients_are_not_mixed(registered):
    id = registered("test/Echo-v0", Echo)
    async_client = AsyncClient("http://127.0.0.1:9")
    sync_client = Client("http://127.0.0.1:9")
    try:
        with pytest.raises(InvalidRequest, match="make_async"):
            envs.make(id, client=async_client)
        with pytest.raises(InvalidRequest, match="use make"):
            envs.make_async(id, client=sync_client)
    finally:
        sync_client.close()
        asyncio.run(async_client.aclose())


def test_plain_factories_and_their_kind(registered):
    plain = registered("test/Plain-v0", Plain, max_episode_steps=2, kwargs={"size": 5})
    plain_async = registered("test/PlainAsync-v0", PlainAsync)
    env = envs.make(plain)
    assert env.unwrapped.size == 5
    assert env.reset(seed=0) == (0, {})
    env.close()
    with pytest.raises(InvalidRequest, match="use make"):
        envs.make_async(plain)
    with pytest.raises(InvalidRequest, match="use make_async"):
        envs.make(plain_async)
    with pytest.raises(InvalidEnvKwargs):
        envs.make(plain, shared_sandbox=True)  # not a sandbox env

    async def scenario():
        async with envs.make_async(plain_async) as env:
            assert await env.reset() == ("ready", {})
            assert (await env.step("x"))[2] is True
            with pytest.raises(EpisodeOver):
                await env.step("x")

    asyncio.run(scenario())


def test_entry_point_strings(registered):
    id = registered("test/ByString-v0", "tests.unit.test_envs:Echo")
    with envs.make(id) as env:
        assert isinstance(env.unwrapped.core, Echo)
    for bad in ("no_colon", "tests.unit.test_envs:Missing", "no.such.module:X"):
        registered(f"test/Bad{len(bad)}-v0", bad)
        with pytest.raises(InvalidRequest):
            envs.make(f"test/Bad{len(bad)}-v0")


# ---------------------------------------------------------------------------------------------
# Wrappers and episode order


def test_make_applies_time_limit_and_order_enforcing(registered):
    id = registered("test/Echo-v0", Echo, max_episode_steps=2)
    env = envs.make(id)
    assert isinstance(env, OrderEnforcing)
    assert isinstance(env.env, gymnasium.wrappers.TimeLimit)
    assert isinstance(env.unwrapped, SandboxEnv)
    assert env.unwrapped.max_episode_steps == 2
    with pytest.raises(ResetNeeded):
        env.step("a")
    env.reset()
    assert env.step("a")[3] is False
    obs, reward, terminated, truncated, info = env.step("b")
    assert (terminated, truncated) == (False, True)
    with pytest.raises(EpisodeOver):
        env.step("c")
    env.reset()
    assert env.step("stop")[2] is True
    with pytest.raises(EpisodeOver):
        env.step("c")
    env.reset()
    with pytest.raises(InvalidAction):
        env.step(12)  # type: ignore[arg-type]
    assert env.step("still going")[0] == "still going"  # an invalid action changes nothing
    env.close()
    env.close()
    with pytest.raises(EnvClosed):
        env.step("x")
    with pytest.raises(EnvClosed):
        env.reset()


def test_make_overrides_and_specs_without_wrappers(registered):
    id = registered("test/Echo-v0", Echo, max_episode_steps=2)
    with envs.make(id, max_episode_steps=None) as env:
        assert not isinstance(env.env, gymnasium.wrappers.TimeLimit)
        env.reset()
        for _ in range(5):
            assert env.step("x")[3] is False
    raw = registered("test/Raw-v0", Echo, order_enforce=False)
    with envs.make(raw) as env:
        assert isinstance(env, SandboxEnv)
        # The env itself still keeps the order.
        with pytest.raises(ResetNeeded):
            env.step("x")


def test_the_unwrapped_env_keeps_the_order_on_its_own():
    env = SandboxEnv(Echo(), max_episode_steps=1)
    with pytest.raises(ResetNeeded):
        env.step("a")
    env.reset(seed=3)
    assert env.step("a")[3] is True
    with pytest.raises(EpisodeOver):
        env.step("a")
    env.close()
    with pytest.raises(EnvClosed):
        env.reset()


def test_a_failed_reset_needs_a_new_reset(registered):
    env = SandboxEnv(Echo(fail_on_seed=7))
    with pytest.raises(InvalidRequest):
        env.reset(seed=7)
    with pytest.raises(ResetNeeded):
        env.step("x")
    env.reset(seed=8)
    assert env.step("x")[0] == "x"
    env.close()


def test_async_wrappers():
    async def scenario():
        env = envs.make_async("rock/GuessNumber-v0", state="memory", max_episode_steps=2)
        assert isinstance(env, AsyncOrderEnforcing)
        assert isinstance(env.env, AsyncTimeLimit)
        assert isinstance(env.unwrapped, AsyncSandboxEnv)
        assert env.spec is not None and env.spec.id == "rock/GuessNumber-v0"
        assert env.observation_space == env.unwrapped.observation_space
        with pytest.raises(ResetNeeded):
            await env.step("1")
        await env.reset(seed=1)
        with pytest.raises(InvalidAction):
            await env.step(None)
        await env.step("0")
        assert (await env.step("0"))[3] is True
        with pytest.raises(EpisodeOver):
            await env.step("1")
        await env.close()
        with pytest.raises(EnvClosed):
            await env.step("1")
        with pytest.raises(InvalidRequest):
            AsyncTimeLimit(env, 0)

    asyncio.run(scenario())


def test_seeding_is_gymnasium_s():
    async def scenario():
        a = envs.make_async("rock/GuessNumber-v0", state="memory")
        b = envs.make_async("rock/GuessNumber-v0", state="memory")
        await a.reset(seed=11)
        await b.reset(seed=11)
        assert a.unwrapped.core.secret == b.unwrapped.core.secret
        assert a.np_random_seed == 11
        secrets = set()
        for seed in range(20):
            await a.reset(seed=seed)
            secrets.add(a.unwrapped.core.secret)
        assert len(secrets) > 10
        await a.close()
        await b.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------
# Checkers


def test_check_env_passes_on_a_good_env():
    envs.check_env("rock/GuessNumber-v0", state="memory")
    env = envs.make("rock/GuessNumber-v0", state="memory")
    envs.check_env(env)  # a given env is checked, not closed
    assert env.reset(seed=1)[0]
    env.close()
    asyncio.run(envs.check_async_env("rock/GuessNumber-v0", state="memory"))


class Liar(Echo):
    """Returns observations outside its space."""

    def step(self, action, ctx):
        yield from ()
        return "x" * 1000, 0.0, False, False, {}


class Forgetful(Echo):
    """Gives a different first observation for the same seed."""

    calls = 0

    def reset(self, ctx):
        Forgetful.calls += 1
        yield from ()
        return f"start {Forgetful.calls}", {}


@pytest.mark.parametrize("core", [Liar, Forgetful])
def test_check_env_catches_broken_envs(registered, core):
    id = registered(f"test/{core.__name__}-v0", core, max_episode_steps=3)
    with pytest.raises(AssertionError):
        envs.check_env(id)
    with pytest.raises(AssertionError):
        asyncio.run(envs.check_async_env(id))


# ---------------------------------------------------------------------------------------------
# Vector envs and groups


def test_vector_env_steps_concurrently_and_autoresets():
    async def scenario():
        vec = envs.make_vec("rock/GuessNumber-v0", 3, state="memory", max_episode_steps=2)
        assert vec.num_envs == 3 and len(vec.observation_space) == 3
        with pytest.raises(ResetNeeded):
            await vec.step(["1"] * 3)
        obs, infos = await vec.reset(seed=[1, 2, 3])
        assert len(obs) == 3 and infos[0] == {"high": 100}
        secrets = [e.unwrapped.core.secret for e in vec.envs]
        obs, rewards, terminated, truncated, infos = await vec.step([str(secrets[0]), "1", "oops"])
        assert rewards.tolist() == [1.0, 0.0, 0.0] and rewards.dtype == np.float64
        assert terminated.tolist() == [True, False, False]
        assert infos[2] == {"valid": False}
        # Env 0 autoresets (its action is ignored); the others hit the time limit.
        obs, rewards, terminated, truncated, infos = await vec.step(["ignored", "1", "1"])
        assert obs[0].startswith("I am thinking") and infos[0] == {"high": 100}
        assert truncated.tolist() == [False, True, True]
        with pytest.raises(InvalidRequest):
            await vec.step(["1"])
        await vec.close()
        with pytest.raises(EnvClosed):
            await vec.reset()

    asyncio.run(scenario())


def test_vector_env_without_autoreset_and_masks():
    async def scenario():
        envs_ = [envs.make_async("rock/GuessNumber-v0", state="memory") for _ in range(2)]
        vec = envs.AsyncVectorEnv(envs_, autoreset_mode="disabled")
        await vec.reset(seed=5)
        secret = vec.envs[0].unwrapped.core.secret
        await vec.step([str(secret), "1"])
        assert vec.done == [True, False] and not vec.all_done
        with pytest.raises(EpisodeOver):
            await vec.step(["1", "1"])
        obs, rewards, terminated, _, infos = await vec.step([None, "1"])
        assert infos[0] == {"skipped": True} and terminated[0] and rewards[0] == 0.0
        obs, infos = await vec.reset(seed=[9, None], mask=[True, False])
        assert vec.done == [False, False] and infos[1] == {}
        await vec.close()
        with pytest.raises(InvalidRequest):
            envs.AsyncVectorEnv([], autoreset_mode="disabled")

    asyncio.run(scenario())


def test_a_failed_reset_closes_the_whole_vector(registered):
    id = registered("test/Echo-v0", Echo, kwargs={"fail_on_seed": 2})

    async def scenario():
        vec = envs.make_vec(id, 3)
        with pytest.raises(InvalidRequest, match="refusing"):
            await vec.reset(seed=0)  # seeds 0, 1, 2: the third fails
        assert all(e.unwrapped.closed for e in vec.envs)
        with pytest.raises(EnvClosed):
            await vec.reset()

    asyncio.run(scenario())


def test_groups_share_a_seed_and_so_a_task():
    async def scenario():
        async with envs.make_group("rock/GuessNumber-v0", seed=4, size=4, state="memory") as g:
            assert isinstance(g, envs.AsyncEnvGroup)
            assert g.seed == 4 and g.metadata["autoreset_mode"] == "disabled"
            obs, _ = await g.reset()
            assert len(set(obs)) == 1
            assert len({e.unwrapped.core.secret for e in g.envs}) == 1
            first = g.envs[0].unwrapped.core.secret
            await g.reset(seed=5)
            assert g.seed == 5
            assert len({e.unwrapped.core.secret for e in g.envs}) == 1
            assert first >= 1
            with pytest.raises(InvalidRequest):
                await g.reset(seed=[1, 2, 3, 4])
        with pytest.raises(InvalidRequest):
            envs.make_group("rock/GuessNumber-v0", seed=1, size=0)

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------
# Clients and garbage collection


def test_default_clients_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("ROCK_BASE_URL", raising=False)
    monkeypatch.setenv("ROCK_URL", "http://rock.example:8123")
    env = envs.make("rock/GuessNumber-v0")
    assert env.unwrapped.client.settings.base_url == "http://rock.example:8123"
    env.close()
    monkeypatch.setenv("ROCK_BASE_URL", "http://base.example:1")

    async def scenario():
        env = envs.make_async("rock/GuessNumber-v0")
        assert env.unwrapped.client.settings.base_url == "http://base.example:1"
        await env.close()

    asyncio.run(scenario())


def test_an_env_dropped_without_close_is_collected():
    env = envs.make("rock/GuessNumber-v0", state="memory")
    env.reset(seed=1)
    client = env.unwrapped.client
    ref = weakref.ref(env.unwrapped)
    del env
    gc.collect()
    assert ref() is None
    assert client._http.is_closed  # its own client was closed by the finalizer


def test_unicode_text_space():
    space = UnicodeText(10)
    assert space.contains("ls -la ✓")
    assert not space.contains("x" * 11)
    assert not space.contains(b"bytes")
    assert space.contains("")
    assert UnicodeText(10, min_length=1).contains("") is False
    space.seed(0)
    sample = space.sample()
    assert sample.isalnum() or sample == ""
    assert space == UnicodeText(10) and space != UnicodeText(11)
    from rock_serve.envs._spaces import fit

    assert fit("a" * 100, 40).startswith("a") and len(fit("a" * 100, 40)) == 40
    assert fit("short", space) == "short"
