"""Benchmark: what a network namespace costs a bwrap sandbox, against network 'none', same run.

Usage: ``.venv/bin/python bench/netns.py [--n 40] [--quick]``

Times, interleaved so both see the same machine load: create -> first command (``create``,
``start``, ``exec echo hi``) and remove, for network ``none`` (bwrap's own ``--unshare-net``)
and ``bridge`` (a namespace with a veth on a test bridge, an address, a route and the nftables
allow-list); and the namespace alone (``BridgeNetwork.create`` + ``remove``: ``ip`` twice,
``nsenter nft`` once). Prints p50 / p99 in ms and the bridge/none ratio. The bridge and its
host table are removed at the end. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid

from rock_serve.config import BridgeNetworkConfig, BwrapRuntimeConfig
from rock_serve.protocol import ExecRequest, SandboxSpec
from rock_serve.runtime.bwrap import BwrapRuntime


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def row(name: str, xs: list[float], floor: list[float] | None = None) -> str:
    ratio = f"{pct(xs, 50) / pct(floor, 50):.2f}x" if floor else ""
    return f"| {name} | {pct(xs, 50):.1f} / {pct(xs, 99):.1f} | {ratio} |"


async def cycle(rt: BwrapRuntime, spec: SandboxSpec) -> tuple[float, float]:
    sid = f"bench-{uuid.uuid4().hex[:10]}"
    t0 = time.perf_counter()
    await rt.create(sid, spec)
    h = await rt.start(sid)
    result = await h.exec(ExecRequest(command=["echo", "hi"]))
    t1 = time.perf_counter()
    assert result.stdout == "hi\n", result
    await rt.remove(sid)
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t1) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 5 if args.quick else args.n
    with tempfile.TemporaryDirectory() as state:
        cfg = BwrapRuntimeConfig(
            state_dir=state,
            cgroup_parent="rock-serve-bench",
            allow_network=True,
            bridge=BridgeNetworkConfig(name=f"rkb{uuid.uuid4().hex[:6]}", subnet="10.218.0.0/24"),
        )
        rt = BwrapRuntime(cfg)
        net = rt.net
        assert net is not None
        try:
            specs = {"none": SandboxSpec(), "bridge": SandboxSpec(network="bridge")}
            first: dict[str, list[float]] = {k: [] for k in specs}
            remove: dict[str, list[float]] = {k: [] for k in specs}
            alone: list[float] = []
            for i in range(n + 2):
                for name, spec in specs.items():
                    a, b = await cycle(rt, spec)
                    if i >= 2:  # two warm-up rounds
                        first[name].append(a)
                        remove[name].append(b)
                t = time.perf_counter()
                net.create(f"bench-ns-{i}", None)
                net.remove(f"bench-ns-{i}")
                if i >= 2:
                    alone.append((time.perf_counter() - t) * 1000)
        finally:
            for info in await rt.list():
                await rt.remove(info.id)
            await rt.close()
            net.teardown()
    print(f"bwrap, n={n} each, interleaved; p50 / p99 in ms, ratio = bridge p50 / none p50\n")
    print("| metric | p50 / p99 | ratio |\n|---|---|---|")
    print(row("create -> first command, network none", first["none"]))
    print(row("create -> first command, network bridge", first["bridge"], first["none"]))
    print(row("remove, network none", remove["none"]))
    print(row("remove, network bridge", remove["bridge"], remove["none"]))
    print(row("namespace alone (create + remove)", alone))


if __name__ == "__main__":
    asyncio.run(main())
