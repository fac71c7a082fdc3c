"""Actor methods are named by reference, so a type checker sees them (issue 13.1).

``_ray.call``/``stream``/``stream_ahead`` take the actor class's method (``Worker.remove``):
mypy checks that it exists and its arguments. These tests guard what mypy cannot see: that no
call in ``deployments/`` names a method by a string literal, and that the names the remaining
run-time dispatchers forward (the SDK's Ray client, the GEM routes) exist on their actors.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from rock_serve.deployments._gem import EnvTable
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.deployments.worker import Worker

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"


#: The methods of ``_gem_app.GemApi`` (a Serve deployment: read here, not imported).
GemApi = {
    f.name
    for c in ast.parse((DEPLOYMENTS / "_gem_app.py").read_text()).body
    if isinstance(c, ast.ClassDef) and c.name == "GemApi"
    for f in c.body
    if isinstance(f, ast.AsyncFunctionDef)
}

#: The entry points that send a method to an actor: (function name, index of the method arg).
TYPED = {"call": 1, "stream": 1, "stream_ahead": 2}

#: Dispatchers whose method is a name chosen at run time (the SDK's Ray transport maps a REST
#: call to a name in its ROUTES table; the GEM routes call the same name on ``GemApi`` or on
#: ``EnvTable``):
#: (file, function, index of the name, actor classes that must all have it).
DYNAMIC = [
    # the Ray transport's ROUTES: ActorCall(None, name) is the Scheduler's, (sandbox, name) a
    # Worker's
    ("client.py", "ActorCall", 1, (Scheduler,)),
    ("client.py", "ActorCall", 1, (Worker,)),
    ("client.py", "_proc", 0, (Worker,)),
    ("_gem.py", "_call", 0, (EnvTable, GemApi)),  # the routes' _call(name, caller, body)
    ("_gem_app.py", "table_call", 0, (EnvTable,)),
]


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            yield name, node


def _literal(node: ast.Call, index: int) -> str | None:
    if len(node.args) > index:
        arg = node.args[index]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
    return None


def test_no_actor_method_is_named_by_a_string_literal():
    found = [
        f"{path.name}:{node.lineno}: {name}(..., {_literal(node, TYPED[name])!r})"
        for path in sorted(DEPLOYMENTS.glob("*.py"))
        for name, node in _calls(path)
        if name in TYPED and _literal(node, TYPED[name]) is not None
    ]
    assert found == []


@pytest.mark.parametrize(("file", "function", "index", "actors"), DYNAMIC)
def test_the_names_forwarded_at_run_time_exist_on_their_actors(file, function, index, actors):
    names = set()
    for name, node in _calls(DEPLOYMENTS / file):
        if name != function:
            continue
        literal = _literal(node, index)
        if function == "_call" and file == "_gem.py":  # two kinds of _call in one file
            first = node.args[0] if node.args else None
            is_scheduler_call = isinstance(first, ast.Constant) and first.value is None
            if is_scheduler_call != (index == 1):
                continue
        if function == "ActorCall":  # the first argument None: a Scheduler call
            first = node.args[0] if node.args else None
            is_scheduler_call = isinstance(first, ast.Constant) and first.value is None
            if is_scheduler_call != (actors == (Scheduler,)):
                continue
        if literal is not None:
            names.add(literal)
    assert names, f"no {function}(...) naming a method in {file}: update DYNAMIC"
    for actor in actors:
        has = actor if isinstance(actor, set) else {n for n in names if hasattr(actor, n)}
        assert sorted(names - has) == [], f"{file} {function}: not methods of {actor}"


@pytest.mark.parametrize("actor", [Worker, Scheduler, EnvTable])
def test_no_actor_method_takes_a_parameter_stream_keeps_for_itself(actor):
    # ``stream(..., backpressure=n)`` is the stream's option, never an actor argument.
    taking = [
        name
        for name, member in inspect.getmembers(actor, callable)
        if not name.startswith("__")
        and "backpressure" in getattr(inspect.signature(member), "parameters", {})
    ]
    assert taking == []


class _Method:
    """An actor method as Ray's handle shows it: ``.remote`` and ``.options``."""

    def __init__(self, name: str, seen: list) -> None:
        self.name, self.seen, self.opts = name, seen, {}

    def options(self, **opts):
        self.opts = opts
        return self

    def remote(self, *args, **kwargs):
        self.seen.append((self.name, args, kwargs, self.opts))
        if self.opts.get("num_returns") == "streaming":
            return _refs([f"{self.name}-1", f"{self.name}-2"])
        return _done(self.name)


async def _done(value):
    return value


async def _refs(values):
    for value in values:
        yield _done(value)


class _Actor:
    def __init__(self) -> None:
        self.seen: list = []

    def __getattr__(self, name: str) -> _Method:
        return _Method(name, self.seen)


async def test_a_typed_call_sends_the_methods_name_and_its_arguments():
    from rock_serve.deployments._ray import call, stream, stream_ahead
    from rock_serve.protocol.ops import ExecOp

    actor = _Actor()
    assert await call(actor, Worker.remove, "sb-1", reason="gone") == "remove"
    req = ExecOp(command="true")
    assert [x async for x in stream(actor, Worker.op_stream, "sb-1", req)] == [
        "op_stream-1",
        "op_stream-2",
    ]
    ahead = stream_ahead(3, actor, Worker.stream_pty, "sb-1", "p1")
    assert [x async for x in ahead] == ["stream_pty-1", "stream_pty-2"]
    assert [(name, args, kwargs) for name, args, kwargs, _ in actor.seen] == [
        ("remove", ("sb-1",), {"reason": "gone"}),
        ("op_stream", ("sb-1", req), {}),
        ("stream_pty", ("sb-1", "p1"), {}),
    ]
    assert actor.seen[1][3] == {"num_returns": "streaming"}
    assert actor.seen[2][3]["_generator_backpressure_num_objects"] == 3
