"""SandboxFusion's POST /run_code on the Admin, through HTTP, on the session's platform.

Every request runs in a fresh sandbox that is deleted afterwards: each test checks the platform
is empty again (GET /v1/sandboxes). The bodies are the ones verl's code-reward path sends
(``verl/utils/reward_score/sandbox_fusion/utils.py``).
"""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.ray


def _verl_body(code: str, language: str = "python", **extra) -> dict:
    """The payload verl's call_sandbox_api posts."""
    body = {
        "compile_timeout": 10,
        "run_timeout": 10,
        "code": code,
        "stdin": None,
        "memory_limit_MB": 1024,
        "language": language,
        "files": {},
        "fetch_files": [],
    }
    body.update(extra)
    return body


def _run(api: httpx.Client, body: dict) -> dict:
    reply = api.post("/run_code", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _sandboxes(api: httpx.Client) -> list[str]:
    return [item["id"] for item in api.get("/v1/sandboxes").json()["items"]]


def test_python_ok_with_stdin_and_files(api):
    code = (
        "import sys, json\n"
        "data = json.load(open('input/data.json'))\n"
        "line = sys.stdin.readline().strip()\n"
        "print(data['a'] + int(line))\n"
        "open('out.txt', 'w').write('written')\n"
    )
    body = _verl_body(
        code,
        stdin="41\n",
        files={"input/data.json": base64.b64encode(b'{"a": 1}').decode()},
        fetch_files=["out.txt", "missing.txt"],
    )
    out = _run(api, body)
    assert out["status"] == "Success", out
    assert out["message"] == ""
    assert out["compile_result"] is None
    run = out["run_result"]
    assert (run["status"], run["return_code"], run["stdout"], run["stderr"]) == (
        "Finished",
        0,
        "42\n",
        "",
    )
    assert run["execution_time"] > 0
    assert out["files"] == {"out.txt": base64.b64encode(b"written").decode()}
    assert out["executor_pod_name"].startswith("sb-")
    assert _sandboxes(api) == []


def test_python_error_is_failed_with_its_traceback(api):
    out = _run(api, _verl_body("print('before')\nraise ValueError('boom')\n"))
    assert out["status"] == "Failed"
    run = out["run_result"]
    assert (run["status"], run["return_code"], run["stdout"]) == ("Finished", 1, "before\n")
    assert "ValueError: boom" in run["stderr"]
    assert _sandboxes(api) == []


def test_timeout_is_time_limit_exceeded(api):
    started = time.monotonic()
    out = _run(
        api,
        _verl_body("import time\nprint('start', flush=True)\ntime.sleep(30)\n", run_timeout=3),
    )
    assert time.monotonic() - started < 25  # the limit ended it, not the 30 s sleep
    assert out["status"] == "Failed"
    run = out["run_result"]
    assert run["status"] == "TimeLimitExceeded"
    assert run["return_code"] is None
    assert run["stdout"] == "start\n"
    assert 2.9 <= run["execution_time"] < 25
    assert _sandboxes(api) == []


def test_bash_and_its_exit_code(api):
    out = _run(api, _verl_body("echo $((20 + 22))\nexit 3\n", language="bash"))
    assert out["status"] == "Failed"
    assert (out["run_result"]["stdout"], out["run_result"]["return_code"]) == ("42\n", 3)
    out = _run(api, _verl_body("cat", language="bash", stdin="piped"))
    assert out["status"] == "Success" and out["run_result"]["stdout"] == "piped"
    assert _sandboxes(api) == []


@pytest.mark.parametrize("language", ["cobol", "brainfuck"])
def test_unsupported_language_is_a_sandbox_error(api, language):
    out = _run(api, _verl_body("int main() {}", language=language))
    assert out["status"] == "SandboxError"
    assert language in out["message"] and "python" in out["message"]
    assert out["run_result"] is None
    assert _sandboxes(api) == []


def test_bad_input(api):
    # Missing fields are a validation error (our error body), as FastAPI refuses them upstream.
    reply = api.post("/run_code", json={"language": "python"})
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "invalid_request"
    # Bad base64 or an escaping path is a SandboxError reply; no sandbox is made.
    out = _run(api, _verl_body("print(1)", files={"x": "***not base64***"}))
    assert out["status"] == "SandboxError"
    out = _run(api, _verl_body("print(1)", fetch_files=["../../etc/passwd"]))
    assert out["status"] == "SandboxError"
    assert _sandboxes(api) == []


def test_concurrent_requests_leave_nothing(api, platform):
    code = "import sys\nprint(sum(range(int(sys.stdin.read()))))\n"

    def one(n: int) -> dict:
        with platform.client() as client:
            return _run(client, _verl_body(code, stdin=str(n)))

    with ThreadPoolExecutor(4) as pool:  # the platform's capacity: never more at once
        results = list(pool.map(one, range(1, 9)))
    assert [r["run_result"]["stdout"] for r in results] == [
        f"{sum(range(n))}\n" for n in range(1, 9)
    ]
    assert _sandboxes(api) == []


def test_a_client_that_goes_away_leaves_no_sandbox(api, platform):
    body = _verl_body("import time\ntime.sleep(120)\n", run_timeout=120)
    with httpx.Client(base_url=platform.url, timeout=httpx.Timeout(2.0)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/run_code", json=body)
    # The request is cancelled when its client goes away; the sandbox goes with it (long
    # before the run's own timeout or the sandbox's TTL).
    deadline = time.monotonic() + 20
    while _sandboxes(api) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _sandboxes(api) == []


#: Compiled and interpreted languages beyond python/bash, with a program printing 42 and the
#: program whose absence from the host root (what a bwrap sandbox sees) is the skip reason.
_TOOLCHAIN_PROGRAMS = {
    "cpp": ("g++", "#include <iostream>\nint main() { std::cout << 6 * 7 << std::endl; }\n"),
    "c": ("gcc", '#include <stdio.h>\nint main(void) { printf("%d\\n", 6 * 7); }\n'),
    "java": (
        "javac",
        "public class Main { public static void main(String[] a) {"
        " System.out.println(6 * 7); } }\n",
    ),
    "nodejs": ("node", "console.log(6 * 7);\n"),
    "go": ("go", 'package main\nimport "fmt"\nfunc main() { fmt.Println(6 * 7) }\n'),
}


@pytest.mark.slow
@pytest.mark.parametrize("language", sorted(_TOOLCHAIN_PROGRAMS))
def test_toolchain_languages_on_bwrap(bwrap_host_tools_platform, language):
    """Each language the bwrap sandbox's root has a toolchain for runs, compile step reported;
    cpu_time comes from the sandbox's cgroup."""
    import shutil

    program, code = _TOOLCHAIN_PROGRAMS[language]
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed on the host root bwrap sandboxes see")
    with bwrap_host_tools_platform.client() as api:
        out = _run(
            api,
            _verl_body(
                code, language=language, memory_limit_MB=2048, run_timeout=30, compile_timeout=60
            ),
        )
        compile_err = (out.get("compile_result") or {}).get("stderr") or ""
        if language == "java" and "Error loading java.security file" in compile_err:
            pytest.skip(
                "the bwrap default root filters /etc (runtime.etc_allow) and the JVM's config "
                "dir /etc/java-*-openjdk is not in it"
            )
        assert out["status"] == "Success", json.dumps(out)[:3000]
        assert out["run_result"]["stdout"].strip() == "42"
        assert out["run_result"]["cpu_time"] is not None and out["run_result"]["cpu_time"] >= 0
        if language in ("cpp", "c", "java", "go"):
            assert out["compile_result"]["status"] == "Finished"
            assert out["compile_result"]["return_code"] == 0
        else:
            assert out["compile_result"] is None
        assert _sandboxes(api) == []


@pytest.mark.slow
def test_compile_error_and_missing_toolchain_on_bwrap(bwrap_host_tools_platform):
    import shutil

    with bwrap_host_tools_platform.client() as api:
        if shutil.which("g++"):
            out = _run(api, _verl_body("int main() { return nope; }", language="cpp"))
            assert out["status"] == "Failed" and out["run_result"] is None
            assert out["compile_result"]["return_code"] != 0
            assert "nope" in out["compile_result"]["stderr"]
        if shutil.which("go") is None:
            out = _run(api, _verl_body("package main", language="go"))
            assert out["status"] == "SandboxError" and "toolchain" in out["message"]
        assert _sandboxes(api) == []
