"""`rock up`'s Ray token and head bookkeeping, without Ray: where the token lives (Ray's own
places), that it is made once with mode 0600, and which processes count as the head's.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from rock_serve.sdk.cli import _platform


def test_the_token_is_made_once_0600_where_ray_looks(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    path = _platform.ensure_ray_token()
    assert path == tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = _platform.ray_token()
    assert token is not None and len(token) == 64
    assert _platform.ensure_ray_token() == path
    assert _platform.ray_token() == token  # kept, not regenerated

    custom = tmp_path / "elsewhere" / "tok"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(custom))
    assert _platform.ensure_ray_token() == custom
    assert _platform.ray_token() != token
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert _platform.ensure_ray_token() is None
    assert _platform.ray_token() == "from-env"


def test_the_ray_clis_get_token_mode_for_a_token_head(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    env = _platform._env(ray_auth=True)
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / ".ray" / "auth_token")
    assert _platform._env(ray_auth=False)["RAY_AUTH_MODE"] == "disabled"
    assert _platform._env(ray_auth=None)["RAY_AUTH_MODE"] == "disabled"  # the caller's


def test_head_pids_finds_a_session_and_a_marker_but_not_zombies_or_others(tmp_path):
    marker = "feedface"
    env = {**os.environ, _platform.MARKER: marker}
    code = (
        "import os, sys, time; os.setsid(); sys.stdout.write('ok\\n'); sys.stdout.flush(); "
        "time.sleep(60)"
    )
    # A process that left the session (as a daemon might) but carries the marker.
    moved = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
    )
    leader = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert moved.stdout is not None and moved.stdout.readline() == "ok\n"
        found = _platform._head_pids(leader.pid, marker, None)
        assert leader.pid in found and moved.pid in found
        assert other.pid not in found and os.getpid() not in found
        _platform._stop_pids([leader.pid, moved.pid], grace=5)
        # Killed, not yet reaped (zombies): not counted as alive.
        assert _platform._head_pids(leader.pid, marker, None) == []
        assert other.poll() is None
    finally:
        for proc in (moved, leader, other):
            proc.kill()
            proc.wait()
        if moved.stdout is not None:
            moved.stdout.close()
