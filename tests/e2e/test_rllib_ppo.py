"""RLlib PPO on a sandbox-backed env, submitted with `ray job submit` to the platform's cluster.

The head is the session's separate `ray start --head` for Ray jobs (``jobs_head`` in conftest,
shared with test_ray_job and test_ray_transport_auth); the platform is serve_config.yaml
deployed there with `serve deploy` on the local runtime, with auth disabled (loopback) and no
audit file. ``examples/rllib_ppo.py`` is submitted with ``examples/`` as its working dir; its
env runner (a Ray actor) makes its sandbox over the Ray transport. The test checks the two
iterations' results and that no sandbox is left, in the API and in the runtime's state dir.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.e2e._head import BIN, ROOT

#: What the job needs in the venv (looked up, not imported: torch is slow to import).
_MISSING = [name for name in ("ray.rllib", "torch") if importlib.util.find_spec(name) is None]
if _MISSING and os.environ.get("ROCK_REQUIRE_RLLIB"):
    raise RuntimeError(f"ROCK_REQUIRE_RLLIB is set but {', '.join(_MISSING)} is not installed")

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(bool(_MISSING), reason=f"needs ray[rllib] and torch: {_MISSING}"),
]


@pytest.mark.timeout(420)
def test_rllib_ppo_trains_on_sandboxes(jobs_head, tmp_path):
    ray_head, namespace, state_dir = jobs_head.head, jobs_head.namespace, jobs_head.state_dir
    submission_id = f"rock-rllib-ppo-{os.getpid()}"
    started = time.monotonic()
    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            ray_head.dashboard,
            "--submission-id",
            submission_id,
            "--working-dir",
            str(ROOT / "examples"),
            "--",
            sys.executable,
            "rllib_ppo.py",
            "--namespace",
            namespace,
            "--iterations",
            "2",
        ],
        env=ray_head.env,
        capture_output=True,
        text=True,
        timeout=360,
        cwd=tmp_path,
        check=False,
    )
    seconds = time.monotonic() - started
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output[-4000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(ray_head.dashboard).get_job_status(submission_id) == (
        JobStatus.SUCCEEDED
    )
    iterations = [
        json.loads(line.removeprefix("ITERATION "))
        for line in submit.stdout.splitlines()
        if line.startswith("ITERATION ")
    ]
    print(f"\nrllib job: {seconds:.0f} s; " + "; ".join(json.dumps(i) for i in iterations))
    assert [i["iteration"] for i in iterations] == [1, 2], output[-4000:]
    assert iterations[0]["env_steps"] >= 128
    assert iterations[1]["env_steps"] >= 2 * 128
    assert iterations[1]["episodes"] >= 1
    assert isinstance(iterations[1]["episode_return_mean"], float)
    assert isinstance(iterations[1]["total_loss"], float)
    assert "DONE" in submit.stdout
    # The env runner's env made its sandbox over the Ray transport.
    (line,) = [x for x in submit.stdout.splitlines() if x.startswith("SANDBOXES ")]
    (env,) = json.loads(line.removeprefix("SANDBOXES "))
    assert env["client"] == "RayClient" and env["sandbox"].startswith("sb-"), env
    # Nothing is left behind: stopping the algorithm closed its envs and their sandboxes.
    assert httpx.get(f"{ray_head.url}/v1/sandboxes", timeout=10).json()["items"] == []
    assert list(state_dir.iterdir()) == []
