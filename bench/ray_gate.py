"""Benchmark: what the Ray transport's token check and audit cost, beside the ungated call.

Usage: ``.venv/bin/python bench/ray_gate.py [--n 400] [--runtime local|bwrap]``

Starts Ray + Serve with the rock-serve app, auth required (one token) and a JSONL audit log,
creates one sandbox and a session, then measures in-session ``echo hi`` p50/p99 (ms), rounds
interleaved:

- the floor: ``platform_client()`` (no gate), the actor methods called directly (what the
  platform's own routes do);
- ``AsyncClient.from_ray(token=...)``: ``Worker.ray_call`` checks the token, the namespace and
  audits the call.

Prints both and the ratio gated/floor. Never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import _harness as harness


async def _measure(n: int, namespace: str, token: str) -> dict[str, list[float]]:
    from rock_serve.deployments.client import platform_client
    from rock_serve.sdk import AsyncClient

    gated = AsyncClient.from_ray(namespace=namespace, token=token)
    floor = platform_client(namespace, tenant="bench")
    record = await gated.create_sandbox(ttl_seconds=600)
    await gated.create_session(record.id)
    samples: dict[str, list[float]] = {"floor": [], "gated": []}
    try:
        for i in range(n + 20):
            for name, client in (("floor", floor), ("gated", gated)):
                started = time.perf_counter()
                result = await client.run(record.id, "echo hi")
                took = time.perf_counter() - started
                assert result.output == "hi\n"
                if i >= 20:  # warm-up rounds left out
                    samples[name].append(took)
    finally:
        await gated.delete_sandbox(record.id)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--runtime", default="local")
    opts = parser.parse_args()

    from rock_serve.auth import generate_token, hash_token

    token = generate_token()
    os.environ["ROCK_TOKEN"] = token  # the harness's clean-up lists and deletes over HTTP
    audit = Path(tempfile.mkdtemp(prefix="rock-bench-audit-")) / "audit.jsonl"
    args = {
        "runtime": opts.runtime,
        "namespace": "rock-bench-gate",
        "auth": {"tokens": [{"name": "bench", "namespace": "bench", "sha256": hash_token(token)}]},
        "audit": {"path": str(audit)},
    }
    with harness.platform({"/": args}):
        samples = asyncio.run(_measure(opts.n, "rock-bench-gate", token))
    floor, gated = samples["floor"], samples["gated"]
    p50f, p99f = harness.pct(floor, 50) * 1000, harness.pct(floor, 99) * 1000
    p50g, p99g = harness.pct(gated, 50) * 1000, harness.pct(gated, 99) * 1000
    print(f"ray echo, direct (floor):      p50 {p50f:.2f} ms  p99 {p99f:.2f} ms  (n={len(floor)})")
    print(f"ray echo, token check + audit: p50 {p50g:.2f} ms  p99 {p99g:.2f} ms  (n={len(gated)})")
    print(f"ratio gated/floor: p50 {p50g / p50f:.2f}  p99 {p99g / p99f:.2f}")
    lines = audit.read_text().count("\n") if audit.exists() else 0
    print(f"audit lines written: {lines}")


if __name__ == "__main__":
    main()
