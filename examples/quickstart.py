"""Quickstart: a sandbox on the running platform, a stateful bash session, files, cleanup.

Run after ``rock up`` (or point ``ROCK_BASE_URL`` at any rock-serve API).
"""

import time

from rock_serve.sdk import Client

with Client() as client:
    started = time.perf_counter()
    with client.sandbox(owner="quickstart", ttl_seconds=300) as sb:
        first = sb.run("echo ready")
        print(f"sandbox {sb.id}: first command after {time.perf_counter() - started:.3f} s")
        sb.run("mkdir -p project && cd project && export NAME=rock")
        print(sb.run("echo hello from $NAME in $(pwd)").output, end="")
        sb.files.write("project/answer.py", "print(6 * 7)\n")
        result = sb.exec(["python3", "project/answer.py"])
        print(f"python3 says {result.stdout.strip()} (exit {result.exit_code})")
        timed = sb.run("sleep 60", timeout=0.5)
        print(f"sleep 60 with a 0.5 s timeout: timed_out={timed.timed_out}")
        print(sb.run("echo the session survived: $NAME").output, end="")
    print("sandbox deleted")
