"""A Ray job that probes the Ray transport's auth; `test_ray_transport_auth.py` submits it.

Usage: python ray_auth_job.py NAMESPACE TOKENS_JSON_FILE. The file maps ``team-a``,
``team-b`` and ``root`` (admin) to platform tokens. Prints one line ``RESULT <json>`` with
what each caller got.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from rock_serve.errors import RockError
from rock_serve.sdk import AsyncClient


async def outcome(coro: object) -> str:
    try:
        await coro  # type: ignore[misc]
        return "ok"
    except RockError as exc:
        return exc.code.value


async def main(namespace: str, tokens: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    nobody = AsyncClient.from_ray(namespace=namespace, token="")
    forged = AsyncClient.from_ray(namespace=namespace, token="rock_" + "x" * 43)
    a = AsyncClient.from_ray(namespace=namespace, token=tokens["team-a"])
    b = AsyncClient.from_ray(namespace=namespace, token=tokens["team-b"])
    root = AsyncClient.from_ray(namespace=namespace, token=tokens["root"])

    health = await nobody.health()
    out["health_anonymous"] = [health.status, len(health.workers)]
    out["health_admin_workers"] = len((await root.health()).workers)
    out["create_without_token"] = await outcome(nobody.create_sandbox(ttl_seconds=120))
    out["create_forged_token"] = await outcome(forged.create_sandbox(ttl_seconds=120))
    out["list_without_token"] = await outcome(nobody.list_sandboxes())

    sb = await a.create_sandbox(ttl_seconds=300, owner="team-a-job")
    out["a_namespace"] = sb.namespace
    await a.create_session(sb.id)
    out["a_run"] = (await a.run(sb.id, "echo secret-of-a > s.txt; echo hi")).output
    await a.write_file(sb.id, "note.txt", b"a's note")
    out["a_stream"] = [
        getattr(item, "data", None) async for item in a.stream_run(sb.id, "echo streamed")
    ]
    out["a_list"] = [r.id for r in await a.list_sandboxes()]

    out["run_without_token"] = await outcome(nobody.run(sb.id, "cat s.txt"))
    out["b_get"] = await outcome(b.get_sandbox(sb.id))
    out["b_run"] = await outcome(b.run(sb.id, "cat s.txt"))
    out["b_read"] = await outcome(b.read_file(sb.id, "note.txt"))
    out["b_exec"] = await outcome(b.exec(sb.id, ["cat", "s.txt"]))
    out["b_delete"] = await outcome(b.delete_sandbox(sb.id))
    out["b_list"] = [r.id for r in await b.list_sandboxes()]
    # Spec fields that weaken containment are an admin's, on this transport as over HTTP.
    out["b_unconfined"] = await outcome(b.create_sandbox(ttl_seconds=60, seccomp="unconfined"))
    out["b_stream"] = await outcome(_drain(b.stream_exec(sb.id, "cat s.txt")))

    out["root_list"] = [r.id for r in await root.list_sandboxes()]
    out["root_read"] = (await root.read_file(sb.id, "note.txt")).decode()
    await root.delete_sandbox(sb.id)
    out["sandbox"] = sb.id
    return out


async def _drain(items: object) -> None:
    async for _ in items:  # type: ignore[attr-defined]
        pass


if __name__ == "__main__":
    import ray

    ray.init()
    tokens = json.loads(Path(sys.argv[2]).read_text())
    print("RESULT " + json.dumps(asyncio.run(main(sys.argv[1], tokens))), flush=True)
