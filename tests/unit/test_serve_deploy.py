"""`serve deploy` is sent again while the dashboard drops the connection (rock up, tests)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from rock_serve.sdk.cli import _platform

FAKE_SERVE = """#!/bin/sh
n=$(cat "{count}" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "{count}"
if [ "$n" -le {drops} ]; then
  echo "requests.exceptions.ConnectionError: ('Connection aborted.', RemoteDisconnected(...))" >&2
  exit 1
fi
if [ "{fail}" = yes ]; then echo "ValueError: bad config" >&2; exit 1; fi
echo deployed "$@"
"""


def _fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drops: int, fail: bool = False) -> Path:
    count = tmp_path / "count"
    script = tmp_path / "serve"
    text = FAKE_SERVE.format(count=count, drops=drops, fail="yes" if fail else "no")
    script.write_text(text)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(_platform, "_bin", lambda name: str(script))
    monkeypatch.setattr(_platform.time, "sleep", lambda s: None)  # no real backoff in tests
    return count


def test_a_dropped_connection_is_sent_again(tmp_path, monkeypatch):
    count = _fake(tmp_path, monkeypatch, drops=2)
    res = _platform.serve_deploy(tmp_path / "c.yaml", "http://127.0.0.1:1", timeout=60)
    assert res.returncode == 0, res.stderr
    assert "deployed deploy" in res.stdout
    assert count.read_text().strip() == "3"


def test_a_refused_config_is_not_sent_again(tmp_path, monkeypatch):
    count = _fake(tmp_path, monkeypatch, drops=0, fail=True)
    res = _platform.serve_deploy(tmp_path / "c.yaml", "http://127.0.0.1:1", timeout=60)
    assert res.returncode == 1
    assert "bad config" in res.stderr
    assert count.read_text().strip() == "1"
