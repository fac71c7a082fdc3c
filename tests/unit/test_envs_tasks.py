"""The built-in envs' task generators, verifier and test runner, run for real in temp dirs.

The verifier and the runner are the very programs the envs send into sandboxes; here they run
as local subprocesses (the local runtime does the same thing), against the reference
solutions (they must pass) and against no or wrong solutions (they must fail).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rock_serve.envs.builtin import _problems, _terminal_tasks
from rock_serve.envs.builtin.code_exec import extract_code
from rock_serve.envs.builtin.terminal import describe, families
from rock_serve.errors import InvalidRequest
from rock_serve.protocol import SessionRunResult

SEEDS = (0, 1, 2)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


def _verify(root: Path, task: _terminal_tasks.TerminalTask) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _terminal_tasks.VERIFIER],
        input=json.dumps(task.check),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_terminal_tasks_are_seeded_and_varied():
    for family in _terminal_tasks.FAMILIES:
        a = _terminal_tasks.generate(5, [family])
        assert a == _terminal_tasks.generate(5, [family])
        assert a.family == family and a.id.startswith(family + "-")
        ids = {_terminal_tasks.generate(seed, [family]).id for seed in range(30)}
        assert len(ids) >= 10, family
    drawn = {
        _terminal_tasks.generate(seed, sorted(_terminal_tasks.FAMILIES)).family
        for seed in range(40)
    }
    assert drawn == set(_terminal_tasks.FAMILIES)


@pytest.mark.parametrize("family", sorted(_terminal_tasks.FAMILIES))
@pytest.mark.parametrize("seed", SEEDS)
def test_terminal_reference_solution_passes_and_nothing_fails(tmp_path, family, seed):
    task = _terminal_tasks.generate(seed, [family])
    solved, untouched = tmp_path / "solved", tmp_path / "untouched"
    for root in (solved, untouched):
        _write(root, task.files)
    for command in task.solution:
        subprocess.run(["bash", "-c", command], cwd=solved, check=True, timeout=30)
    ok = _verify(solved, task)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip() == "PASS"
    bad = _verify(untouched, task)
    assert bad.returncode == 1 and bad.stdout.startswith("FAIL"), bad.stdout + bad.stderr


def test_fix_test_cannot_be_solved_by_editing_the_tests(tmp_path):
    task = _terminal_tasks.generate(3, ["fix_test"])
    _write(tmp_path, task.files)
    # The visible tests fail before the fix (the task is real) ...
    before = subprocess.run(
        [sys.executable, "-m", "unittest", "-q"],
        cwd=tmp_path / "project",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert before.returncode != 0
    # ... and emptying them does not fool the verifier, which brings its own copy.
    (tmp_path / "project" / "test_mathutils.py").write_text("")
    assert _verify(tmp_path, task).returncode == 1


def test_fix_config_checks_every_setting(tmp_path):
    task = _terminal_tasks.generate(4, ["fix_config"])
    _write(tmp_path, task.files)
    for command in task.solution:
        subprocess.run(["bash", "-c", command], cwd=tmp_path, check=True, timeout=30)
    assert _verify(tmp_path, task).returncode == 0
    # Changing anything else breaks it again.
    cache = tmp_path / "service" / "config" / "cache.ini"
    cache.write_text(cache.read_text().replace("6379", "6380"))
    assert _verify(tmp_path, task).returncode == 1


def test_terminal_family_names_are_checked():
    assert families(None) == tuple(sorted(_terminal_tasks.FAMILIES))
    assert families("fix_test") == ("fix_test",)
    with pytest.raises(InvalidRequest, match="families: count_lines"):
        families(["fix_test", "nope"])
    with pytest.raises(InvalidRequest):
        families([])


def test_command_results_read_like_a_terminal():
    result = SessionRunResult(
        session="s", output="out", exit_code=1, duration=0.1, timed_out=True, truncated=True
    )
    text = describe(result, 2.0)
    assert text.startswith("out\n")
    assert "[output truncated]" in text and "timed out after 2s" in text
    assert text.endswith("[exit code 1]")


# ---------------------------------------------------------------------------------------------
# CodeExec


def _run(tmp_path: Path, problem: _problems.Problem, code: str, timeout: float = 10) -> dict:
    job = {
        "code": code,
        "entry": "solve",
        "inputs": problem.inputs,
        "expected": problem.expected,
        "timeout": timeout,
    }
    done = subprocess.run(
        [sys.executable, "-I", "-c", _problems.RUNNER],
        input=json.dumps(job),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout + 30,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_problems_are_seeded_and_varied():
    for family in _problems.FAMILIES:
        a = _problems.generate(9, [family])
        assert a == _problems.generate(9, [family])
        assert len(a.inputs) == len(a.expected) >= 5
        assert "solve(" in a.prompt and "Examples" in a.prompt
        assert len({_problems.generate(seed, [family]).id for seed in range(20)}) >= 5, family


@pytest.mark.parametrize("family", sorted(_problems.FAMILIES))
def test_code_reference_passes_and_a_wrong_answer_fails(tmp_path, family):
    problem = _problems.generate(1, [family])
    good = _run(tmp_path, problem, problem.solution)
    assert good == {"status": "ok", "passed": len(problem.inputs), "total": len(problem.inputs)}
    bad = _run(tmp_path, problem, "def solve(*args):\n    return None\n")
    assert bad["status"] == "ok" and bad["passed"] < bad["total"]
    assert bad["failure"]["got"] == {"value": None}


def test_code_runner_reports_errors(tmp_path):
    problem = _problems.generate(2, ["multiples"])
    assert _run(tmp_path, problem, "def solve(:\n")["status"] == "load_error"
    assert _run(tmp_path, problem, "while True:\n    pass\n", timeout=1)["status"] == "timeout"
    assert _run(tmp_path, problem, "import os\nos._exit(3)\n")["status"] == "crash"
    raising = _run(tmp_path, problem, "def solve(n):\n    raise ValueError('no')\n")
    assert raising["passed"] == 0 and "ValueError: no" in raising["failure"]["got"]["error"]
    # Prints of the candidate do not disturb the protocol.
    noisy = _run(tmp_path, problem, "print('{}')\n" + problem.solution)
    assert noisy["passed"] == noisy["total"]


def test_extract_code():
    assert extract_code("x = 1") == "x = 1"
    answer = "Here:\n```\nprint(0)\n```\nand\n```python\ndef solve(n):\n    return n\n```\nok"
    assert extract_code(answer) == "def solve(n):\n    return n\n"
    assert extract_code("```py\na = 2\n```") == "a = 2\n"
