"""``rock demo``: one sandbox, one session, a few commands, timings, cleanup."""

from __future__ import annotations

import secrets
import time

from rich.console import Console
from rich.table import Table

from rock_serve.config import AnyRuntimeConfig
from rock_serve.protocol import ExecRequest, SandboxSpec, SessionCreateRequest, SessionRunRequest

DEMO_COMMANDS = [
    ("who am I", "hostname; id -un"),
    ("state persists", "cd /tmp && export GREETING=hello && greet() { echo $GREETING $1; }"),
    ("...in the session", "pwd; greet sandbox"),
    ("exit codes", "false; echo status=$?"),
    (
        "no network",
        "python3 -c 'import socket; socket.create_connection((\"1.1.1.1\", 80), 1)' 2>&1 | tail -1",
    ),
    ("timeout kills the command", "sleep 30"),
    ("...not the session", "echo still $GREETING"),
]


async def run_demo(cfg: AnyRuntimeConfig, console: Console) -> None:
    """Run the demo on the runtime ``cfg`` describes and print what happened."""
    runtime = cfg.build()
    sandbox_id = f"sb-demo-{secrets.token_hex(4)}"
    console.print(f"runtime [bold]{cfg.type}[/bold], sandbox [bold]{sandbox_id}[/bold]")
    t0 = time.perf_counter()
    try:
        await runtime.create(sandbox_id, SandboxSpec(labels={"demo": "1"}))
        handle = await runtime.start(sandbox_id)
        await handle.create_session(SessionCreateRequest())
        first = await handle.run_in_session(SessionRunRequest(command="echo ready"))
        ready_ms = (time.perf_counter() - t0) * 1000
        console.print(f"create -> first command: [bold green]{ready_ms:.1f} ms[/bold green]")
        table = Table("step", "command", "output", "exit", "ms")
        for title, command in DEMO_COMMANDS:
            timeout = 0.5 if command == "sleep 30" else 30
            res = await handle.run_in_session(SessionRunRequest(command=command, timeout=timeout))
            note = " (timed out)" if res.timed_out else ""
            table.add_row(
                title,
                command if len(command) < 48 else command[:45] + "...",
                res.output.strip() + note,
                str(res.exit_code),
                f"{res.duration * 1000:.2f}",
            )
        console.print(table)
        lat = []
        for _ in range(200):
            t = time.perf_counter()
            await handle.run_in_session(SessionRunRequest(command="echo hi"))
            lat.append((time.perf_counter() - t) * 1000)
        lat.sort()
        console.print(
            f"in-session echo over 200 runs: p50 [bold]{lat[100]:.3f} ms[/bold], "
            f"p99 {lat[197]:.3f} ms"
        )
        stats = await handle.stats()
        mem = stats.memory_limit_bytes
        console.print(
            f"limits seen inside: memory {mem // (1 << 20) if mem else 'none'} MiB, "
            f"pids {stats.pids_limit or 'none'}, processes now {stats.pids_current}"
        )
        exec_res = await handle.exec(ExecRequest(command=["uname", "-sr"]))
        took = exec_res.duration * 1000
        console.print(f"one-shot exec: {exec_res.stdout.strip()} ({took:.2f} ms)")
        assert first.output == "ready\n"
        await handle.close()
    finally:
        t = time.perf_counter()
        await runtime.remove(sandbox_id)
        console.print(f"removed in {(time.perf_counter() - t) * 1000:.1f} ms")
        await runtime.close()
