"""Seeded programming problems of ``rock/CodeExec-v0`` and their test runner (pure: no I/O).

Each family is a template with seeded parameters and a reference solution (Python source);
the expected outputs of the hidden tests are computed by running that reference here, in
the trainer's process, on inputs drawn from the same seed. In the sandbox, :data:`RUNNER`
(``python3 -I -c RUNNER``, the job as JSON on stdin) writes the candidate to
``solution.py`` and calls it from a child process that only ever sees the inputs; the
runner compares the outputs with the expected ones, which never enter the child.
"""

from __future__ import annotations

import hashlib
import json
import random
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["FAMILIES", "RUNNER", "Problem", "generate"]


@dataclass(frozen=True)
class Problem:
    """One generated problem."""

    family: str
    statement: str
    signature: str
    solution: str
    inputs: list[list[Any]]
    expected: list[Any]
    id: str

    @property
    def prompt(self) -> str:
        """What the agent reads: statement, signature, three examples."""
        examples = "\n".join(
            f"    solve({', '.join(json.dumps(a) for a in args)}) == {json.dumps(out)}"
            for args, out in list(zip(self.inputs, self.expected, strict=True))[:3]
        )
        return (
            f"{self.statement}\n\nWrite a Python function `{self.signature}`. Examples:\n"
            f"{examples}\n\nAnswer with the code only (a ```python block is fine). Hidden "
            "tests decide the reward."
        )


def _multiples(rng: random.Random) -> tuple[str, str, str, list[list[Any]]]:
    a, b = rng.sample(range(2, 10), 2)
    statement = (
        f"Return the sum of all positive integers below n that are divisible by {a} or by {b}."
    )
    solution = (
        f"def solve(n):\n    return sum(i for i in range(1, n) if i % {a} == 0 or i % {b} == 0)\n"
    )
    inputs = [[n] for n in [10, 0, 1, rng.randint(2, 50), rng.randint(100, 1000), a * b + 1]]
    return statement, "solve(n: int) -> int", solution, inputs


def _rotate(rng: random.Random) -> tuple[str, str, str, list[list[Any]]]:
    k = rng.randint(1, 9)
    statement = (
        f"Return a new list: xs rotated right by {k} positions (the last item moves to the "
        f"front, {k} times). An empty list stays empty; a list shorter than {k} rotates by "
        f"{k} modulo its length."
    )
    solution = textwrap.dedent(
        f"""\
        def solve(xs):
            if not xs:
                return []
            k = {k} % len(xs)
            return xs[len(xs) - k:] + xs[:len(xs) - k]
        """
    )
    inputs = [[[rng.randint(0, 99) for _ in range(n)]] for n in [5, 0, 1, k, k + 3, 12, 2]]
    return statement, "solve(xs: list[int]) -> list[int]", solution, inputs


def _caesar(rng: random.Random) -> tuple[str, str, str, list[list[Any]]]:
    k = rng.randint(1, 25)
    statement = (
        f"Shift every ASCII letter of s forward by {k} places in the alphabet, wrapping from z "
        "to a and keeping its case; leave every other character unchanged."
    )
    solution = textwrap.dedent(
        f"""\
        def solve(s):
            out = []
            for c in s:
                if "a" <= c <= "z":
                    out.append(chr((ord(c) - 97 + {k}) % 26 + 97))
                elif "A" <= c <= "Z":
                    out.append(chr((ord(c) - 65 + {k}) % 26 + 65))
                else:
                    out.append(c)
            return "".join(out)
        """
    )
    words = ["Hello, World!", "", "xyz", "Zebra 42", "attack at dawn", "Ümlaut ok?"]
    inputs = [[w] for w in words] + [["".join(rng.choice("abcXYZ .!") for _ in range(12))]]
    return statement, "solve(s: str) -> str", solution, inputs


def _run_length(rng: random.Random) -> tuple[str, str, str, list[list[Any]]]:
    count_first = rng.random() < 0.5
    piece = 'f"{j - i}{s[i]}"' if count_first else 'f"{s[i]}{j - i}"'
    shape = "the count then the character" if count_first else "the character then the count"
    statement = (
        "Return the run-length encoding of s: every maximal run of one repeated character "
        f"becomes {shape} (for example 'aaa' becomes "
        f"'{'3a' if count_first else 'a3'}'), in order; the empty string encodes to ''."
    )
    solution = textwrap.dedent(
        f"""\
        def solve(s):
            out = []
            i = 0
            while i < len(s):
                j = i
                while j < len(s) and s[j] == s[i]:
                    j += 1
                out.append({piece})
                i = j
            return "".join(out)
        """
    )
    inputs = [
        ["aaabcc"],
        [""],
        ["z"],
        ["".join(rng.choice("ab") * rng.randint(1, 4) for _ in range(6))],
    ]
    inputs.append(["x" * rng.randint(10, 30)])
    return statement, "solve(s: str) -> str", solution, inputs


def _recurrence(rng: random.Random) -> tuple[str, str, str, list[list[Any]]]:
    x, y, c = rng.randint(0, 3), rng.randint(1, 5), rng.randint(1, 4)
    statement = (
        f"A sequence starts a(0) = {x}, a(1) = {y}, and a(n) = a(n-1) + {c} * a(n-2) for "
        "n >= 2. Return a(n) for a given n >= 0."
    )
    solution = textwrap.dedent(
        f"""\
        def solve(n):
            a, b = {x}, {y}
            for _ in range(n):
                a, b = b, b + {c} * a
            return a
        """
    )
    inputs = [[n] for n in [0, 1, 2, 5, rng.randint(6, 20), rng.randint(40, 90)]]
    return statement, "solve(n: int) -> int", solution, inputs


def _digit_sum(rng: random.Random) -> tuple[str, str, str, list[list[Any]]]:
    base = rng.randint(2, 9)
    statement = (
        f"Return the sum of the digits of the non-negative integer n written in base {base}."
    )
    solution = textwrap.dedent(
        f"""\
        def solve(n):
            total = 0
            while n > 0:
                total += n % {base}
                n //= {base}
            return total
        """
    )
    inputs = [
        [n] for n in [base**3, 0, base - 1, rng.randint(10, 10**6), rng.randint(10**12, 10**15)]
    ]
    return statement, "solve(n: int) -> int", solution, inputs


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str, str, list[list[Any]]]]] = {
    "multiples": _multiples,
    "rotate": _rotate,
    "caesar": _caesar,
    "run_length": _run_length,
    "recurrence": _recurrence,
    "digit_sum": _digit_sum,
}


def reference(solution: str, inputs: Sequence[Sequence[Any]]) -> list[Any]:
    """Expected outputs: our own reference source run here, JSON-normalized."""
    scope: dict[str, Any] = {}
    exec(compile(solution, "<reference>", "exec"), scope)
    return [json.loads(json.dumps(scope["solve"](*args))) for args in inputs]


def generate(seed: int, families: Sequence[str]) -> Problem:
    """The problem of ``seed``, drawn among ``families`` (deterministic)."""
    rng = random.Random(seed)
    family = rng.choice(sorted(families))
    statement, signature, solution, inputs = FAMILIES[family](rng)
    expected = reference(solution, inputs)
    digest = hashlib.sha256(json.dumps([statement, inputs]).encode()).hexdigest()[:12]
    return Problem(family, statement, signature, solution, inputs, expected, f"{family}-{digest}")


#: Runs in the sandbox as ``python3 -I -c RUNNER``; its job arrives as JSON on stdin.
RUNNER = textwrap.dedent(
    r'''
    import json, os, subprocess, sys

    job = json.load(sys.stdin)
    CHILD = """
    import json, os, sys
    job = json.loads(sys.stdin.read())
    real = sys.stdout
    sys.stdout = sys.stderr
    sys.path.insert(0, os.getcwd())
    try:
        import solution
        fn = getattr(solution, job["entry"])
    except BaseException as e:
        real.write("\\n" + json.dumps({"load_error": "%s: %s" % (type(e).__name__, e)}) + "\\n")
        real.flush()
        os._exit(0)
    results = []
    for args in job["inputs"]:
        try:
            value = fn(*args)
            json.dumps(value)
            results.append({"value": value})
        except BaseException as e:
            results.append({"error": ("%s: %s" % (type(e).__name__, e))[:300]})
    real.write("\\n" + json.dumps({"results": results}) + "\\n")
    real.flush()
    os._exit(0)
    """
    with open("solution.py", "w", encoding="utf-8") as f:
        f.write(job["code"])
    report = {"status": "ok", "passed": 0, "total": len(job["expected"])}
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", CHILD],
            input=json.dumps({"entry": job["entry"], "inputs": job["inputs"]}),
            capture_output=True, text=True, timeout=job["timeout"],
            errors="replace",
        )
    except subprocess.TimeoutExpired:
        report["status"] = "timeout"
    else:
        lines = proc.stdout.strip().splitlines()
        try:
            answer = json.loads(lines[-1]) if lines else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            report["status"] = "crash"
            report["detail"] = proc.stderr.strip()[-600:] or "exit status %d" % proc.returncode
        elif "load_error" in answer:
            report["status"] = "load_error"
            report["detail"] = answer["load_error"][-600:]
        else:
            results = answer.get("results") or []
            for args, want, got in zip(job["inputs"], job["expected"], results):
                if isinstance(got, dict) and "value" in got and got["value"] == want:
                    report["passed"] += 1
                elif "failure" not in report:
                    report["failure"] = {"args": args, "expected": want, "got": got}
    print(json.dumps(report))
    '''
)
