"""What the platform benchmarks share: a free port, percentiles, and a platform to measure.

:func:`platform` starts a local Ray (its own temp dir, never another cluster) with Serve and
one or more rock-serve apps, waits until each is healthy, yields their URLs, then deletes
every sandbox and stops only what it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import httpx

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

#: The Admin's ``max_ongoing_requests`` in serve_config.yaml.
MAX_ONGOING = 1000


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(samples: list[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of ``samples`` (nearest rank), 0 when empty."""
    if not samples:
        return 0.0
    xs = sorted(samples)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def runtime_config(runtime: str, state_dir: str) -> dict[str, Any]:
    """A runtime block for ``runtime`` keeping its state in ``state_dir``."""
    config: dict[str, Any] = {"type": runtime, "state_dir": state_dir}
    if runtime == "bwrap":
        config["cgroup_parent"] = "rock-serve-bench"
    return config


def _wait_healthy(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            if httpx.get(f"{url}/v1/health", timeout=5).json().get("status") == "ok":
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the platform at {url} did not become healthy")
        time.sleep(0.2)


@contextlib.contextmanager
def platform(apps: Mapping[str, Mapping[str, Any]], extra: Any = None) -> Iterator[dict[str, str]]:
    """Ray + Serve + one rock-serve app per entry of ``apps`` (route prefix -> ServerArgs
    data; a runtime given by name gets a temporary state dir). ``extra(serve)`` may add more
    apps. Yields route prefix -> URL."""
    import ray
    from ray import serve

    from rock_serve.config import parse_server_args
    from rock_serve.deployments.admin import Admin
    from rock_serve.sdk import Client

    temp = tempfile.mkdtemp(prefix="rsbench-", dir="/tmp")
    states: list[str] = []
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        if extra is not None:
            extra(serve)
        urls: dict[str, str] = {}
        for prefix, data in apps.items():
            args = dict(data)
            if not isinstance(args.get("runtime"), Mapping):  # a name: give it a state dir
                states.append(tempfile.mkdtemp(prefix="rock-bench-state-"))
                args["runtime"] = runtime_config(str(args.get("runtime", "local")), states[-1])
            admin: Any = Admin  # as serve_config.yaml deploys it
            app = admin.options(max_ongoing_requests=MAX_ONGOING).bind(
                parse_server_args(args).model_dump(mode="json")
            )
            name = prefix.strip("/") or "rock"
            serve.run(app, name=name, route_prefix=prefix)
            urls[prefix] = base + prefix.rstrip("/")
            _wait_healthy(urls[prefix])
        yield urls
        for url in urls.values():
            with Client(url) as client:
                for record in client.list_sandboxes():
                    with contextlib.suppress(Exception):
                        client.delete_sandbox(record.id)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        for path in (temp, *states):
            shutil.rmtree(path, ignore_errors=True)
