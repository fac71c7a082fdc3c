"""Benchmark: the port relay (issue 15.2) against direct loopback to the same server, same run.

Usage: ``.venv/bin/python bench/ports.py [--n 300] [--mb 64] [--quick]``

Starts Ray + Serve with one rock-serve app on the local runtime (its sandboxes share the host's
network, so the very server the relay reaches is also reachable directly on loopback), starts
``tests/e2e/_port_servers.py`` inside a sandbox, then measures with one keep-alive httpx client:

- HTTP ``GET /echo`` latency p50/p99 through ``/v1/sandboxes/{id}/ports/{port}/echo`` and
  directly (the floor), with the ratio relay/direct;
- a ``GET /blob`` download of ``--mb`` MiB (MB/s) both ways of reaching it, with the ratio;
- a chunked ``POST /sum`` upload of ``--mb`` MiB (MB/s) both ways;
- the raw TCP tunnel (``sb.ports.connect``): echo of ``--mb`` MiB (MB/s, bytes both ways)
  against a plain socket to the same echo server.

Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import pct, platform  # noqa: E402

from rock_serve.sdk import Client  # noqa: E402
from rock_serve.sdk._sync_sandbox import Sandbox  # noqa: E402

SERVERS = Path(__file__).resolve().parents[1] / "tests" / "e2e" / "_port_servers.py"


def _latency(http: httpx.Client, url: str, n: int) -> list[float]:
    http.get(url).raise_for_status()  # warm the connection
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        http.get(url).raise_for_status()
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def _download(http: httpx.Client, url: str, size: int) -> float:
    t0 = time.perf_counter()
    got = 0
    with http.stream("GET", url) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_bytes():
            got += len(chunk)
    assert got == size, (got, size)
    return size / (time.perf_counter() - t0) / 1e6


def _upload(http: httpx.Client, url: str, size: int) -> float:
    block = os.urandom(1 << 20)

    def body():
        for _ in range(size >> 20):
            yield block

    t0 = time.perf_counter()
    resp = http.post(url, content=body())
    resp.raise_for_status()
    assert resp.json()["length"] == size
    return size / (time.perf_counter() - t0) / 1e6


def _echo(write, write_eof, read, size: int) -> float:
    """MB/s of an echo of ``size`` bytes (written by a thread, read here)."""
    block = os.urandom(1 << 20)

    def send():
        for _ in range(size >> 20):
            write(block)
        write_eof()

    t0 = time.perf_counter()
    sender = threading.Thread(target=send)
    sender.start()
    got = 0
    while data := read():
        got += len(data)
    sender.join()
    assert got == size, (got, size)
    return size / (time.perf_counter() - t0) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="requests per latency series")
    parser.add_argument("--mb", type=int, default=64, help="MiB per throughput run")
    parser.add_argument("--quick", action="store_true", help="n=50, 16 MiB")
    opts = parser.parse_args()
    n, size = (50, 16 << 20) if opts.quick else (opts.n, opts.mb << 20)
    with platform({"/": {"runtime": "local", "namespace": "rock-bench-ports"}}) as urls:
        base = urls["/"]
        with Client(base, timeout=120) as client:
            record = client.create_sandbox(owner="bench-ports", ttl_seconds=1800)
            sb = Sandbox(client, record, delete_on_exit=False, heartbeat=False)
            sb.files.write("port_servers.py", SERVERS.read_bytes())
            sb.run("python3 port_servers.py ports.json >/dev/null 2>&1 &", session="srv")
            ports = None
            while ports is None:
                out = sb.exec("cat ports.json 2>/dev/null")
                ports = json.loads(out.stdout) if out.exit_code == 0 and out.stdout else None
                time.sleep(0.05)
            relay, direct = sb.ports.url(ports["http"]), f"http://127.0.0.1:{ports['http']}/"
            rows = []
            with httpx.Client(timeout=300) as http:
                r, d = _latency(http, relay + "echo", n), _latency(http, direct + "echo", n)
                rows.append(("HTTP GET /echo p50 ms", pct(r, 50), pct(d, 50)))
                rows.append(("HTTP GET /echo p99 ms", pct(r, 99), pct(d, 99)))
                blob = f"blob?n={size}"
                rows.append(
                    (
                        f"download {size >> 20} MiB MB/s",
                        _download(http, relay + blob, size),
                        _download(http, direct + blob, size),
                    )
                )
                rows.append(
                    (
                        f"upload {size >> 20} MiB MB/s",
                        _upload(http, relay + "sum", size),
                        _upload(http, direct + "sum", size),
                    )
                )
            with sb.ports.connect(ports["tcp"]) as stream:
                tunnel = _echo(stream.write, stream.write_eof, stream.read, size)
            with socket.create_connection(("127.0.0.1", ports["tcp"])) as sock:
                plain = _echo(
                    sock.sendall,
                    lambda: sock.shutdown(socket.SHUT_WR),
                    lambda: sock.recv(1 << 20),
                    size,
                )
            rows.append((f"TCP tunnel echo {size >> 20} MiB MB/s", tunnel, plain))
            client.delete_sandbox(record.id)
    print(f"\nport relay vs direct loopback (local runtime, n={n}, same server, same run)")
    print("| metric | relay | direct | relay/direct |\n|---|---|---|---|")
    for name, relayed, floor in rows:
        print(f"| {name} | {relayed:.2f} | {floor:.2f} | {relayed / floor:.2f}x |")


if __name__ == "__main__":
    main()
