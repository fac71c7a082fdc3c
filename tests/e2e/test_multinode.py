"""The platform on a simulated 3-node cluster (``ray.cluster_utils.Cluster``).

The session's ``platform`` fixture holds ``ray.init`` in this process, so the cluster runs in a
subprocess (``jobs/multinode.py``) with its own temp dir and ``RAY_TMPDIR`` (Cluster writes the
"current cluster" address file there, not in the machine's /tmp/ray). It checks one Worker per
node, sandboxes spread over the nodes, and that removing a node reports its sandboxes
``failed``/``lost`` while the others keep working. About 25 s here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parent / "jobs" / "multinode.py"


@pytest.mark.timeout(200)
def test_multinode_workers_spread_and_node_loss(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and len(lines) == 1, (proc.stdout + proc.stderr)[-4000:]
    out = json.loads(lines[0].removeprefix("RESULT "))
    print(f"\nmultinode: {json.dumps({k: v for k, v in out.items() if k.endswith('_s')})}")

    # One Worker per node, and the sandboxes spread over all three.
    assert out["workers"] == out["nodes"] and len(out["nodes"]) == 3
    assert sorted(out["spread"]) == out["nodes"]
    assert sorted(out["spread"].values()) == [2, 2, 2]
    # The removed node's sandboxes are reported lost; a call to one is a typed error.
    assert out["lost_reported"] is True
    assert out["lost_states"] == [["failed", "lost"], ["failed", "lost"]]
    assert out["lost_call"] == "SandboxFailed"
    # The others keep working, the lost node's Worker leaves health, and nothing is left.
    assert out["kept_ok"] == [True, True, True, True]
    assert out["health_workers"] == 2
    assert out["lost_deleted"] == ["ok", "ok"]
    assert out["left"] == []
