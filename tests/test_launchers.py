"""The bin/ launchers run from a checkout."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["firehose-edge", "firehose-worker", "firehose-cluster",
                                  "firehose-ctl", "firehose-keys"])
def test_launcher_shows_help(name):
    result = subprocess.run([sys.executable, str(ROOT / "bin" / name), "--help"],
                            capture_output=True, text=True, timeout=30, cwd="/")
    assert result.returncode == 0, result.stderr
    assert f"usage: {name}" in result.stdout


def test_worker_with_unknown_id_is_a_clear_error():
    result = subprocess.run([sys.executable, str(ROOT / "bin" / "firehose-worker"), "--id", "w9"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "no worker with id 'w9'" in result.stderr
