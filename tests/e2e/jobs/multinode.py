"""The platform on a simulated 3-node cluster; `test_multinode.py` runs this in its own process.

Usage: python multinode.py WORKDIR (the local runtime's state goes there). Starts
``ray.cluster_utils.Cluster`` (head + 2 nodes), deploys the app (local runtime), creates
sandboxes through the SDK's Ray transport, removes one node and prints one line
``RESULT <json>`` with what it saw. Always shuts the cluster down.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from typing import Any

import ray
from ray import serve
from ray.cluster_utils import Cluster

from rock_serve.deployments.app import build_app
from rock_serve.errors import RockError
from rock_serve.protocol import FailureReason, SandboxState
from rock_serve.sdk import AsyncClient

NAMESPACE = "rock-e2e-multi"
SANDBOXES = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _until(check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.2)


async def scenario(cluster: Cluster, nodes: dict[str, Any], out: dict[str, Any]) -> None:
    client = AsyncClient.from_ray(namespace=NAMESPACE)

    async def three_workers() -> bool:
        return len((await client.health()).workers) == 3

    await _until(three_workers, 30)
    health = await client.health()
    out["workers"] = sorted(w.node_id for w in health.workers)
    out["nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])

    records = [await client.create_sandbox(ttl_seconds=600) for _ in range(SANDBOXES)]
    out["spread"] = {}
    for r in records:
        out["spread"][r.node_id] = out["spread"].get(r.node_id, 0) + 1
    for r in records:
        await client.create_session(r.id)
        assert (await client.run(r.id, "echo up")).output == "up\n"

    # Remove a non-head node (the Scheduler lives on the head).
    victim_id = next(nid for nid in out["spread"] if nid != cluster.head_node.node_id)
    t0 = time.monotonic()
    cluster.remove_node(nodes[victim_id])
    out["removed"] = victim_id
    lost = [r.id for r in records if r.node_id == victim_id]
    kept = [r.id for r in records if r.node_id != victim_id]

    async def all_lost() -> bool:
        recs = [await client.get_sandbox(sid) for sid in lost]
        return all(r.state == SandboxState.FAILED and r.reason == FailureReason.LOST for r in recs)

    out["lost_reported"] = await _until(all_lost, 30)
    out["lost_after_s"] = round(time.monotonic() - t0, 2)
    out["lost_states"] = [
        [r.state.value, r.reason.value if r.reason else None]
        for r in [await client.get_sandbox(sid) for sid in lost]
    ]
    out["kept_ok"] = [(await client.run(sid, "echo still")).output == "still\n" for sid in kept]
    try:
        t1 = time.monotonic()
        await asyncio.wait_for(client.run(lost[0], "echo gone"), 90)
        out["lost_call"] = "no error"
    except RockError as exc:
        out["lost_call"] = type(exc).__name__
    except TimeoutError:
        out["lost_call"] = "timeout"
    out["lost_call_s"] = round(time.monotonic() - t1, 2)
    out["health_workers"] = len((await client.health()).workers)
    for sid in kept:
        await client.delete_sandbox(sid)
    for sid in lost:
        try:
            await client.delete_sandbox(sid)
            out.setdefault("lost_deleted", []).append("ok")
        except RockError as exc:
            out.setdefault("lost_deleted", []).append(type(exc).__name__)
    out["left"] = [r.id for r in await client.list_sandboxes()]


def main(workdir: str) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    temp_dir = tempfile.mkdtemp(prefix="rsm-", dir="/tmp")  # short: socket paths
    # Cluster writes "<RAY_TMPDIR>/ray/ray_current_cluster": keep it out of the machine's /tmp/ray.
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "temp_dir": temp_dir, "include_dashboard": False},
    )
    try:
        nodes = {cluster.head_node.node_id: cluster.head_node}
        for _ in range(2):
            node = cluster.add_node(num_cpus=1)
            nodes[node.node_id] = node
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        out["cluster_s"] = round(time.monotonic() - t0, 2)
        serve.start(
            http_options={"host": "127.0.0.1", "port": _free_port(), "location": "HeadOnly"}
        )
        args = {
            "runtime": {"type": "local", "state_dir": os.path.join(workdir, "state")},
            "namespace": NAMESPACE,
            "max_sandboxes_per_node": 4,
            "reap_interval_seconds": 0.2,
        }
        serve.run(build_app(args), name="rock", route_prefix="/")
        out["deployed_s"] = round(time.monotonic() - t0, 2)
        asyncio.run(scenario(cluster, nodes, out))
        out["total_s"] = round(time.monotonic() - t0, 2)
    finally:
        print("RESULT " + json.dumps(out), flush=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
