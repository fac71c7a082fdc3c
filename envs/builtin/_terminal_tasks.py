"""Seeded task generator and verifier of ``rock/Terminal-v0`` (pure: no I/O here).

A task is an instruction, the files of a small workspace, the input of the verifier and a
reference solution (bash commands). The verifier (:data:`VERIFIER`) is a stdlib-only Python
program run in the sandbox at the end of the episode (``python3 -c VERIFIER``, its input as
JSON on stdin, never written to the workspace): exit status 0 means solved.
"""

from __future__ import annotations

import hashlib
import json
import random
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FAMILIES", "VERIFIER", "TerminalTask", "generate"]


@dataclass(frozen=True)
class TerminalTask:
    """One generated task."""

    family: str
    instruction: str
    files: dict[str, str]
    check: dict[str, Any]
    solution: tuple[str, ...]
    id: str = field(default="")

    def with_id(self) -> TerminalTask:
        """The task with its id: family plus a digest of what the agent sees."""
        blob = json.dumps([self.instruction, self.files], sort_keys=True).encode()
        digest = hashlib.sha256(blob).hexdigest()[:12]
        return TerminalTask(
            self.family,
            self.instruction,
            self.files,
            self.check,
            self.solution,
            f"{self.family}-{digest}",
        )


# ---------------------------------------------------------------------------------------------
# Family: make the failing test pass

_FUNCTIONS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    # name: (correct source, [(buggy fragment replacement: old -> new)])
    "clamp": (
        "def clamp(x, lo, hi):\n"
        '    """x limited to the range [lo, hi]."""\n'
        "    return max(lo, min(x, hi))\n",
        [("max(lo, min(x, hi))", "min(lo, max(x, hi))"), ("min(x, hi)", "min(x, hi - 1)")],
    ),
    "mean": (
        "def mean(xs):\n"
        '    """The arithmetic mean of a non-empty list."""\n'
        "    return sum(xs) / len(xs)\n",
        [("sum(xs) / len(xs)", "sum(xs) / (len(xs) + 1)"), ("sum(xs)", "sum(xs[1:])")],
    ),
    "count_words": (
        "def count_words(text):\n"
        '    """The number of whitespace-separated words."""\n'
        "    return len(text.split())\n",
        [("text.split()", 'text.split(" ")')],
    ),
    "is_leap": (
        "def is_leap(year):\n"
        '    """Whether year is a leap year of the Gregorian calendar."""\n'
        "    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)\n",
        [
            ("year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)", "year % 4 == 0"),
            ("year % 400 == 0", "year % 300 == 0"),
        ],
    ),
    "last_n": (
        "def last_n(xs, n):\n"
        '    """The last n items of xs (all of them if n >= len(xs); none if n <= 0)."""\n'
        "    return xs[-n:] if n > 0 else []\n",
        [("xs[-n:] if n > 0 else []", "xs[-n:]"), ("xs[-n:]", "xs[-n + 1:]")],
    ),
}


def _function_cases(name: str, rng: random.Random) -> list[tuple[tuple[Any, ...], Any]]:
    """Test inputs (with expected outputs) of one function; always include the edge cases."""
    if name == "clamp":
        lo = rng.randint(-20, 0)
        hi = rng.randint(1, 20)
        xs = [lo - rng.randint(1, 9), lo, hi, hi + rng.randint(1, 9), rng.randint(lo, hi)]
        return [((x, lo, hi), max(lo, min(x, hi))) for x in xs]
    if name == "mean":
        lists = [[rng.randint(-50, 50) for _ in range(rng.randint(1, 6))] for _ in range(4)]
        return [((xs,), sum(xs) / len(xs)) for xs in lists]
    if name == "count_words":
        words = ["alpha", "beta", "gamma", "delta", "eps"]
        texts = [
            " ".join(rng.sample(words, rng.randint(1, 4))),
            "  " + "   ".join(rng.sample(words, 3)) + " ",
            "one\ttwo\nthree",
        ]
        return [((t,), len(t.split())) for t in texts]
    if name == "is_leap":
        years = [rng.choice([1900, 2100, 2200]), 2000, rng.choice([2024, 1996, 2012]), 2023]
        leap = [y % 4 == 0 and (y % 100 != 0 or y % 400 == 0) for y in years]
        return [((y,), v) for y, v in zip(years, leap, strict=True)]
    xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 7))]
    ns = [0, 1, len(xs), len(xs) + 2, rng.randint(1, len(xs))]
    return [((xs, n), xs[-n:] if n > 0 else []) for n in ns]


def _test_source(name: str, cases: Sequence[tuple[tuple[Any, ...], Any]], cls: str) -> str:
    lines = [f"class {cls}(unittest.TestCase):"]
    for i, (args, expected) in enumerate(cases):
        call = f"{name}({', '.join(repr(a) for a in args)})"
        lines.append(f"    def test_{name}_{i}(self):")
        lines.append(f"        self.assertEqual({call}, {expected!r})")
        lines.append("")
    return "\n".join(lines)


def _fails(source: str, name: str, cases: Sequence[tuple[tuple[Any, ...], Any]]) -> bool:
    scope: dict[str, Any] = {}
    exec(compile(source, "<generated>", "exec"), scope)  # our own generated code
    return any(scope[name](*args) != expected for args, expected in cases)


def _fix_test(rng: random.Random) -> TerminalTask:
    names = sorted(_FUNCTIONS)
    buggy = rng.choice(names)
    shown = sorted(rng.sample([n for n in names if n != buggy], 2) + [buggy])
    correct = {n: _FUNCTIONS[n][0] for n in shown}
    old, new = rng.choice(_FUNCTIONS[buggy][1])
    broken = dict(correct)
    broken[buggy] = correct[buggy].replace(old, new, 1)
    cases = {n: _function_cases(n, rng) for n in shown}
    for _ in range(20):  # the visible tests must show the bug
        if _fails(broken[buggy], buggy, cases[buggy][:3]):
            break
        cases[buggy] = _function_cases(buggy, rng)
    module = "\n\n".join(broken[n] for n in shown)
    header = "import unittest\n\nfrom mathutils import " + ", ".join(shown) + "\n\n\n"
    visible = header + "\n\n".join(
        _test_source(n, cases[n][:3], f"Test{n.title().replace('_', '')}") for n in shown
    )
    visible += '\n\nif __name__ == "__main__":\n    unittest.main()\n'
    hidden = _test_source(buggy, cases[buggy], "TestHidden")
    fixed = "\n\n".join(correct[n] for n in shown)
    instruction = (
        "The Python project in ./project has a failing test: run `cd project && python3 -m "
        "unittest` to see it. Find the bug in project/mathutils.py and fix the code (not the "
        "tests) so that every test passes."
    )
    return TerminalTask(
        family="fix_test",
        instruction=instruction,
        files={
            "project/mathutils.py": module,
            "project/test_mathutils.py": visible,
            "project/README.md": "Small math helpers. Tests: `python3 -m unittest`.\n",
        },
        check={
            "kind": "unittest",
            "dir": "project",
            "tests": [visible, header + hidden],
        },
        solution=(f"cat > project/mathutils.py <<'EOF'\n{fixed}EOF",),
    )


# ---------------------------------------------------------------------------------------------
# Family: find and fix a config value

_CONFIG: dict[str, dict[str, dict[str, str]]] = {
    "app.ini": {"server": {"listen_port": "8080", "workers": "4", "log_level": "info"}},
    "database.ini": {
        "database": {"host": "db.internal", "port": "5432", "name": "orders", "pool_size": "10"}
    },
    "cache.ini": {"cache": {"host": "cache.internal", "port": "6379", "ttl_seconds": "300"}},
}

_DESCRIBE = {
    ("app.ini", "listen_port"): ("the web server must listen on port {v}", "int"),
    ("app.ini", "workers"): ("the web server must run {v} worker processes", "int"),
    ("app.ini", "log_level"): ("the web server must log at level '{v}'", "level"),
    ("database.ini", "port"): ("the service must reach its database on port {v}", "int"),
    ("database.ini", "pool_size"): (
        "the database connection pool must hold {v} connections",
        "int",
    ),
    ("database.ini", "name"): ("the service must use the database named '{v}'", "name"),
    ("cache.ini", "port"): ("the cache must be reached on port {v}", "int"),
    ("cache.ini", "ttl_seconds"): ("cache entries must live {v} seconds", "int"),
}


def _ini(sections: dict[str, dict[str, str]]) -> str:
    out = []
    for section, values in sections.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {v}" for k, v in values.items())
        out.append("")
    return "\n".join(out)


def _fix_config(rng: random.Random) -> TerminalTask:
    config = json.loads(json.dumps(_CONFIG))
    config["database.ini"]["database"]["name"] = rng.choice(["orders", "billing", "inventory"])
    config["app.ini"]["server"]["workers"] = str(rng.randint(2, 16))
    config["database.ini"]["database"]["pool_size"] = str(rng.choice([5, 10, 20, 40]))
    (file, key), (template, kind) = rng.choice(sorted(_DESCRIBE.items()))
    section = next(iter(config[file]))
    right = config[file][section][key]
    if kind == "int":
        delta = rng.choice([1, 2, 3, 10])
        wrong = str(int(right) - delta if int(right) > delta else int(right) + delta)
    elif kind == "level":
        wrong = rng.choice(["debug", "warning", "error"])
    else:
        wrong = rng.choice(["orders_old", "test", "staging"])
    files = {f"service/config/{name}": _ini(sections) for name, sections in config.items()}
    broken = json.loads(json.dumps(config))
    broken[file][section][key] = wrong
    files[f"service/config/{file}"] = _ini(broken[file])
    files["service/README.md"] = (
        "The service reads every *.ini file under config/ at start-up.\n"
        "Ops notes: settings are `key = value` lines in [sections].\n"
    )
    requirement = template.format(v=right)
    instruction = (
        f"The service in ./service will not work: {requirement}, but one setting in its "
        "configuration under ./service/config says otherwise. Find that setting and fix its "
        "value; change nothing else."
    )
    expected = {f"service/config/{name}": sections for name, sections in config.items()}
    path = f"service/config/{file}"
    fix = f"sed -i 's/^{key} = {wrong}$/{key} = {right}/' {path}"
    return TerminalTask(
        family="fix_config",
        instruction=instruction,
        files=files,
        check={"kind": "ini", "expected": expected},
        solution=(fix,),
    )


# ---------------------------------------------------------------------------------------------
# Family: count lines and write the answer

_MESSAGES = [
    "request served",
    "cache miss for key user:{n}",
    "retrying upstream call ({n}/3)",
    "slow query took {n} ms",
    "queue depth is {n}",
    "connection reset by peer",
    "user {n} logged in",
    "job {n} finished",
]
_LEVELS = ["DEBUG", "INFO", "WARN", "ERROR"]


def _count_lines(rng: random.Random) -> TerminalTask:
    level = rng.choice(["ERROR", "WARN", "DEBUG"])
    lines = []
    for i in range(rng.randint(40, 160)):
        lv = rng.choices(_LEVELS, weights=[2, 6, 2, 1])[0]
        msg = rng.choice(_MESSAGES).format(n=rng.randint(1, 999))
        stamp = f"2024-05-{1 + i // 60:02d}T{i % 24:02d}:{i % 60:02d}:{rng.randint(0, 59):02d}"
        lines.append(f"{stamp} [{lv}] {msg}")
    for i in rng.sample(range(len(lines)), 3):  # never a zero count
        head, _, tail = lines[i].partition(" [")
        lines[i] = f"{head} [{level}]{tail.partition(']')[2]}"
    count = sum(1 for line in lines if f"[{level}]" in line)
    instruction = (
        f"Count the lines of logs/app.log whose level is {level} (the level is the word in "
        "square brackets) and write just that number to the file answer.txt."
    )
    return TerminalTask(
        family="count_lines",
        instruction=instruction,
        files={"logs/app.log": "\n".join(lines) + "\n"},
        check={"kind": "file_equals", "path": "answer.txt", "expected": str(count)},
        solution=(f"grep -c '\\[{level}\\]' logs/app.log > answer.txt",),
    )


# ---------------------------------------------------------------------------------------------
# Family: find a token in a tree

_WORDS = ["lorem", "ipsum", "dolor", "sit", "amet", "quis", "nostrud", "tempor", "magna", "velit"]


def _find_token(rng: random.Random) -> TerminalTask:
    token = "TOKEN-" + "".join(rng.choice("0123456789abcdef") for _ in range(16))
    dirs = ["data", "data/archive", "data/archive/2023", "data/reports", "data/tmp"]
    files: dict[str, str] = {}
    for i in range(rng.randint(12, 24)):
        path = f"{rng.choice(dirs)}/{rng.choice(_WORDS)}_{i}.txt"
        body = [" ".join(rng.choice(_WORDS) for _ in range(8)) for _ in range(rng.randint(2, 8))]
        files[path] = "\n".join(body) + "\n"
    decoy = "TOKEN-" + "x" * 4  # not a full token: a careless grep for TOKEN- finds it too
    files[f"data/notes_{rng.randint(0, 99)}.md"] = f"The real token is not {decoy}.\n"
    target = rng.choice(sorted(files))
    lines = files[target].splitlines()
    lines.insert(rng.randint(0, len(lines)), f"access {token} granted")
    files[target] = "\n".join(lines) + "\n"
    instruction = (
        "Somewhere under ./data one file holds an access token: the text TOKEN- followed by "
        "16 hexadecimal digits. Write that token (and nothing else) to the file answer.txt."
    )
    return TerminalTask(
        family="find_token",
        instruction=instruction,
        files=files,
        check={"kind": "file_equals", "path": "answer.txt", "expected": token},
        solution=("grep -rhoE 'TOKEN-[0-9a-f]{16}' data > answer.txt",),
    )


FAMILIES: dict[str, Callable[[random.Random], TerminalTask]] = {
    "fix_test": _fix_test,
    "fix_config": _fix_config,
    "count_lines": _count_lines,
    "find_token": _find_token,
}


def generate(seed: int, families: Sequence[str]) -> TerminalTask:
    """The task of ``seed``, drawn among ``families`` (deterministic)."""
    rng = random.Random(seed)
    family = rng.choice(sorted(families))
    return FAMILIES[family](rng).with_id()


#: The verifier, run as ``python3 -c VERIFIER`` in the episode directory, input on stdin.
VERIFIER = textwrap.dedent(
    r"""
    import configparser, io, json, os, sys, unittest

    check = json.load(sys.stdin)
    kind = check["kind"]

    def fail(msg):
        print("FAIL: " + msg)
        sys.exit(1)

    if kind == "file_equals":
        try:
            with open(check["path"], encoding="utf-8", errors="replace") as f:
                got = f.read().strip()
        except OSError as e:
            fail("cannot read %s: %s" % (check["path"], e.strerror))
        if got != check["expected"]:
            fail("%s holds %r" % (check["path"], got[:80]))
    elif kind == "ini":
        for path, sections in sorted(check["expected"].items()):
            parser = configparser.ConfigParser(interpolation=None)
            try:
                with open(path, encoding="utf-8") as f:
                    parser.read_file(f)
            except (OSError, configparser.Error) as e:
                fail("cannot parse %s: %s" % (path, e))
            got = {s: dict(parser[s]) for s in parser.sections()}
            if got != sections:
                fail("%s does not hold the right settings" % path)
    elif kind == "unittest":
        sys.path.insert(0, os.path.abspath(check["dir"]))
        suite = unittest.TestSuite()
        for i, source in enumerate(check["tests"]):
            scope = {"__name__": "verifier_%d" % i}
            try:
                exec(compile(source, "<verifier tests %d>" % i, "exec"), scope)
            except Exception as e:
                fail("the code does not import: %s: %s" % (type(e).__name__, e))
            for value in list(scope.values()):
                if isinstance(value, type) and issubclass(value, unittest.TestCase):
                    suite.addTests(unittest.defaultTestLoader.loadTestsFromTestCase(value))
        out = io.StringIO()
        result = unittest.TextTestRunner(stream=out, verbosity=0).run(suite)
        if not result.wasSuccessful():
            failed = len(result.failures) + len(result.errors)
            fail("%d of %d tests fail" % (failed, result.testsRun))
    else:
        fail("unknown check " + kind)
    print("PASS")
    """
)
