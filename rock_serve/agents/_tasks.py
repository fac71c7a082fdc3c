"""Agent tasks: a small repository, an instruction, and a verifier that runs in the sandbox.

The built-in task (``fix_add``) is a tiny Python package whose ``add`` subtracts; its unit test
fails. The verifier does not trust the repository's tests (the agent may edit them): it imports
the module fresh and checks hidden cases, then runs the repository's own test file from a
pristine copy. Reward 1.0 when both pass, else 0.0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["AgentTask", "BUILTIN_TASKS", "builtin_task"]


@dataclass(frozen=True)
class AgentTask:
    """What an agent is asked to do, and how the answer is checked.

    Attributes:
        id: A short name.
        instruction: The task statement handed to the agent.
        files: The repository, relative path -> content, written before the agent starts.
        verifier: Python source run with ``python3 -c`` in the repository directory after the
            agent exits; exit code 0 means solved (reward 1.0).
        solution: Shell commands that solve the task (for scripted policies and tests).
    """

    id: str
    instruction: str
    files: Mapping[str, str]
    verifier: str
    solution: tuple[str, ...] = field(default=())


_CALC = '''"""Small arithmetic helpers."""


def add(a, b):
    """Return the sum of a and b."""
    return a - b


def double(x):
    """Return twice x."""
    return add(x, x)
'''

_TEST = """import unittest

from calc import add, double


class CalcTest(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(2, 3), 5)
        self.assertEqual(add(-1, 1), 0)

    def test_double(self):
        self.assertEqual(double(4), 8)


if __name__ == "__main__":
    unittest.main()
"""

_VERIFY_FIX_ADD = f"""
import importlib, subprocess, sys, tempfile, os, shutil
sys.path.insert(0, os.getcwd())
calc = importlib.import_module("calc")
cases = [((2, 3), 5), ((-1, 1), 0), ((10, 32), 42), ((0, 0), 0), ((1.5, 2.5), 4.0)]
for args, want in cases:
    got = calc.add(*args)
    if got != want:
        sys.exit("add%r = %r, want %r" % (args, got, want))
if calc.double(21) != 42:
    sys.exit("double(21) = %r, want 42" % (calc.double(21),))
tmp = tempfile.mkdtemp()
shutil.copy("calc.py", tmp)
with open(os.path.join(tmp, "test_calc.py"), "w") as f:
    f.write({_TEST!r})
sys.exit(subprocess.call([sys.executable, "-m", "unittest", "-q", "test_calc"], cwd=tmp))
"""

BUILTIN_TASKS: dict[str, AgentTask] = {
    "fix_add": AgentTask(
        id="fix_add",
        instruction=(
            "The unit tests in test_calc.py fail. Find the bug in calc.py and fix it so that "
            "`python3 -m unittest test_calc` passes. Do not change the tests."
        ),
        files={"calc.py": _CALC, "test_calc.py": _TEST},
        verifier=_VERIFY_FIX_ADD,
        solution=(
            "cat calc.py",
            # Output without timings: a replay of the episode sees the very same observations.
            "sed -i 's/return a - b/return a + b/' calc.py && "
            "python3 -m unittest test_calc > /dev/null 2>&1 && echo 'the tests pass'",
        ),
    ),
}


def builtin_task(name: str = "fix_add") -> AgentTask:
    """A built-in task by name.

    Raises:
        InvalidRequest: No such task.
    """
    from rock_serve.errors import InvalidRequest

    try:
        return BUILTIN_TASKS[name]
    except KeyError:
        raise InvalidRequest(
            f"unknown agent task {name!r}; built-in tasks: {', '.join(sorted(BUILTIN_TASKS))}"
        ) from None
