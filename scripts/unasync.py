#!/usr/bin/env python3
"""Generate the sync SDK from the async SDK (as httpcore does), or check it is up to date.

    python scripts/unasync.py          # rewrite sdk/_sync.py and sdk/_sync_sandbox.py
    python scripts/unasync.py --check  # exit 1 if they differ from what would be generated

The rewrite is token based: ``async def``/``async with``/``async for`` lose ``async``, ``await``
goes, and the names in ``SUBS`` are swapped whole-word. The result is formatted with ruff, so
the generated files pass ``ruff format --check`` like every other file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = {
    ROOT / "sdk" / "_async.py": ROOT / "sdk" / "_sync.py",
    ROOT / "sdk" / "_async_sandbox.py": ROOT / "sdk" / "_sync_sandbox.py",
    ROOT / "sdk" / "_async_llm.py": ROOT / "sdk" / "_sync_llm.py",
    ROOT / "sdk" / "_async_transport.py": ROOT / "sdk" / "_sync_transport.py",
    ROOT / "sdk" / "_async_ports.py": ROOT / "sdk" / "_sync_ports.py",
    ROOT / "sdk" / "_async_process.py": ROOT / "sdk" / "_sync_process.py",
}
HEADER = "# Generated from {source} by scripts/unasync.py: edit the async file, then regenerate.\n"

SUBS = {
    "AsyncClient": "Client",
    "AsyncTransport": "Transport",
    "AsyncAdminTransport": "AdminTransport",
    "AsyncDirectTransport": "DirectTransport",
    "AsyncSpreadTransport": "SpreadTransport",
    "AsyncHTTPTransport": "HTTPTransport",
    "AsyncByteStream": "SyncByteStream",
    "handle_async_request": "handle_request",
    "_async_transport": "_sync_transport",
    "AsyncSandbox": "Sandbox",
    "AsyncSandboxFiles": "SandboxFiles",
    "AsyncSnapshots": "Snapshots",
    "AsyncSandboxPorts": "SandboxPorts",
    "AsyncPortStream": "PortStream",
    "_async_ports": "_sync_ports",
    "websockets.asyncio.client": "websockets.sync.client",
    "AsyncProcessClient": "ProcessClient",
    "AsyncSandboxProcesses": "SandboxProcesses",
    "AsyncProcessOutput": "ProcessOutput",
    "AsyncProcess": "Process",
    "__aiter__": "__iter__",
    "_async_process": "_sync_process",
    "AsyncHeartbeat": "Heartbeat",
    "AsyncBaseTransport": "BaseTransport",
    "AsyncIterator": "Iterator",
    "AsyncIterable": "Iterable",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "aclose": "close",
    "aclosing": "closing",
    "aiter_lines": "iter_lines",
    "aiter_bytes": "iter_bytes",
    "aread": "read",
    "asleep": "sleep",
    "_async": "_sync",
    "_async_sandbox": "_sync_sandbox",
    "asynchronous": "synchronous",
    "AsyncSandboxLLM": "SandboxLLM",
    "AsyncLLMCallHandle": "LLMCallHandle",
    "_async_llm": "_sync_llm",
}
_WORD = re.compile(r"\b(" + "|".join(sorted(map(re.escape, SUBS), key=len, reverse=True)) + r")\b")
_ASYNC_KW = re.compile(r"\basync (def|with|for)\b")
_AWAIT = re.compile(r"\bawait ")


def unasync_text(text: str) -> str:
    """The sync twin of an async module's source."""
    out = []
    for line in text.splitlines(keepends=True):
        line = _ASYNC_KW.sub(r"\1", line)
        line = _AWAIT.sub("", line)
        line = _WORD.sub(lambda m: SUBS[m.group(1)], line)
        out.append(line)
    return "".join(out)


def _ruff() -> str:
    local = Path(sys.executable).parent / "ruff"
    found = str(local) if local.exists() else shutil.which("ruff")
    if found is None:
        raise SystemExit("ruff not found (install the dev extra)")
    return found


def _format(text: str, target: Path) -> str:
    """Sort imports and format as the repository's ruff settings say."""
    ruff = _ruff()
    name = str(target.relative_to(ROOT))
    for args in (["check", "--select", "I", "--fix-only", "--quiet"], ["format"]):
        text = subprocess.run(
            [ruff, *args, "--stdin-filename", name, "-"],
            input=text,
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
    return text


def generate(source: Path, target: Path) -> str:
    """The full text of ``target`` as generated from ``source``."""
    body = unasync_text(source.read_text())
    return _format(HEADER.format(source=source.name) + body, target)


def main(argv: list[str]) -> int:
    """Regenerate the sync files, or with ``--check`` report those that are stale."""
    check = "--check" in argv
    stale = []
    for source, target in FILES.items():
        text = generate(source, target)
        if target.exists() and target.read_text() == text:
            continue
        if check:
            stale.append(target.relative_to(ROOT))
        else:
            target.write_text(text)
            print(f"wrote {target.relative_to(ROOT)}")
    if stale:
        print("out of date (run scripts/unasync.py): " + ", ".join(map(str, stale)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
