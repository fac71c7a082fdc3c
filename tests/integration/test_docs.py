"""The README's Python example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.contract.conftest import bwrap_unavailable

README = Path(__file__).resolve().parents[2] / "README.md"

_SKIP = bwrap_unavailable()


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_an_example():
    assert len(_python_blocks()) == 1


@pytest.mark.bwrap
@pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))
def test_readme_example_runs(tmp_path):
    code = _python_blocks()[0].replace('"/tmp/rock-demo"', repr(str(tmp_path / "state")))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "/tmp"
