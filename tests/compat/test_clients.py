"""rock.make (rl-rock), gem.make_vec + ToolEnvWrapper (gem-llm), sandbox-fusion's run_code and
verl's call_sandbox_api, each client unmodified in its own venv, against the platform.

Header-less clients carry the token the way they can: rl-rock's ``RockEnv`` as HTTP Basic in
``ROCK_BASE_URL`` (or anonymously where ``auth.anonymous`` opens the GEM routes),
sandbox-fusion and verl as ``?token=`` in the /run_code URL.
"""

from __future__ import annotations

import os
import shutil
from urllib.parse import urlsplit

import pytest

from .conftest import PUBLIC, CompatPlatform, run_driver

#: The session platform (a Ray head and a deploy) starts inside the first test's budget.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

#: language -> the program its toolchain needs (what the host root the sandbox sees has).
TOOLCHAINS = {
    "cpp": "g++",
    "c": "gcc",
    "go": "go",
    "java": "javac",
    "nodejs": "node",
    "rust": "rustc",
}


def toolchain(language: str) -> str | None:
    """Why ``language`` cannot run in a sandbox of this machine, or None when it can.

    The local runtime's sandboxes see the host's programs but not its home directory.
    """
    found = shutil.which(TOOLCHAINS[language])
    if found is None:
        return f"{TOOLCHAINS[language]} is not installed"
    if os.path.basename(os.path.realpath(found)) == "rustup":
        return "rustc is a rustup proxy that needs ~/.rustup, which sandboxes do not see"
    return None


def _basic_url(compat: CompatPlatform, token: str) -> str:
    parts = urlsplit(compat.url)
    return f"{parts.scheme}://rock:{token}@{parts.netloc}"


def _platform_empty(compat: CompatPlatform, user: str = "alice") -> bool:
    with compat.client(user) as api:
        return api.get("/v1/sandboxes").json()["items"] == []


def test_rock_make_with_basic_auth_in_the_base_url(compat: CompatPlatform) -> None:
    env = {"ROCK_BASE_URL": _basic_url(compat, compat.tokens["bob"])}
    out = run_driver("rl-rock", "rock_env.py", env=env)
    assert out["terminated"] is True and out["reward"] == 1.0, out
    assert out["steps"] <= 7
    assert _platform_empty(compat, "bob")


def test_rock_make_anonymous_where_the_namespace_allows_it(compat: CompatPlatform) -> None:
    out = run_driver("rl-rock", "rock_env.py", env={"ROCK_BASE_URL": compat.url})
    assert out.get("terminated") is True, out
    # Anonymous GEM callers act in the configured namespace; other routes still need a token.
    with compat.client(None) as anon:
        assert anon.get("/v1/sandboxes").status_code == 401
        reply = anon.post("/apis/envs/sandbox/v1/start_async", json={"image": "python:3.11"})
        assert reply.status_code == 401 and reply.json()["status"] == "Failed"
    assert PUBLIC


def test_rock_make_with_a_wrong_token_is_refused(compat: CompatPlatform) -> None:
    env = {"ROCK_BASE_URL": _basic_url(compat, "rk_not-a-token")}
    out = run_driver("rl-rock", "rock_env.py", env=env)
    assert "401" in out["error"]


def test_gem_make_vec_seed_and_a_sandboxed_tool(compat: CompatPlatform) -> None:
    out = run_driver("gem-llm", "gem_vec.py", compat.url, compat.tokens["alice"])
    assert len(out["vec_obs"]) == 2 and all(out["vec_obs"])
    assert len(out["vec_step_rewards"]) == 2
    assert out["seeded_same"] is True  # seed reaches the env: same seed, same task
    assert "42 True" in out["tool_obs"], out
    assert _platform_empty(compat)


def test_sandbox_fusion_client_with_token_in_the_url(compat: CompatPlatform) -> None:
    available = [lang for lang in TOOLCHAINS if toolchain(lang) is None]
    missing = sorted(
        lang for lang in TOOLCHAINS if toolchain(lang) == f"{TOOLCHAINS[lang]} is not installed"
    )
    # sandbox-fusion posts to f"{endpoint}/run_code" (no room for a query): Basic in the URL.
    # sandbox-fusion's client knows no "c" (verl's payload carries it: see the verl test).
    languages = ["python", "bash", *[lang for lang in available if lang != "c"]]
    if "cpp" in available:
        languages.append("cpp-compile-error")
    out = run_driver(
        "sandbox-fusion",
        "fusion.py",
        _basic_url(compat, compat.tokens["alice"]),
        *languages,
    )
    for language in languages:
        if language.endswith("-compile-error"):
            continue
        reply = out[language]
        assert reply["status"] == "Success", (language, reply)
        assert reply["run_result"]["stdout"].strip() == "42", (language, reply)
        if language in ("cpp", "c", "go", "java", "rust"):
            assert reply["compile_result"]["status"] == "Finished"
            assert reply["compile_result"]["return_code"] == 0
    if "cpp" in available:
        failed = out["cpp-compile-error"]
        assert failed["status"] == "Failed" and failed["run_result"] is None
        assert failed["compile_result"]["return_code"] != 0
        assert "undefined_name" in failed["compile_result"]["stderr"]
    if "c" in available:  # no client knows "c": SandboxFusion's wire format, by hand
        with compat.client("alice") as api:
            body = {"code": '#include <stdio.h>\nint main(void) { puts("c-ok"); }\n'}
            reply = api.post("/run_code", json={**body, "language": "c"}).json()
        assert reply["status"] == "Success", reply
        assert reply["run_result"]["stdout"] == "c-ok\n"
        assert reply["compile_result"]["return_code"] == 0
        assert reply["run_result"]["cpu_time"] is None or reply["run_result"]["cpu_time"] >= 0
    # A toolchain absent from the host root the sandbox sees is a SandboxError naming it.
    if missing:
        absent = run_driver(
            "verl",
            "verl_payload.py",
            f"{compat.url}/run_code?token={compat.tokens['alice']}",
            f"only:{missing[0]}",
        )[missing[0]]["result"]
        assert absent["status"] == "SandboxError" and "toolchain" in absent["message"]
    assert _platform_empty(compat)


def test_verl_call_sandbox_api_with_query_token(compat: CompatPlatform) -> None:
    url = f"{compat.url}/run_code?token={compat.tokens['alice']}"
    out = run_driver("verl", "verl_payload.py", url)
    ok = out["ok"]["result"]
    assert ok["status"] == "Success" and ok["run_result"]["stdout"] == "hello\n"
    error = out["error"]["result"]
    assert error["status"] == "Failed" and error["run_result"]["return_code"] == 4
    timeout = out["timeout"]["result"]
    assert timeout["run_result"]["status"] == "TimeLimitExceeded"
    if shutil.which("g++"):
        compiled = out["compile_error"]["result"]
        assert compiled["status"] == "Failed"
        assert compiled["compile_result"]["return_code"] != 0  # verl's compile-error branch

    assert _platform_empty(compat)
