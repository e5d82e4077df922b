"""`diffu-lsp pull` (a machine that cannot reach the hub gets one clear line, fast) and `doctor`'s honest sample job."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "5"}])
def test_pull_without_the_hub_says_so_in_one_line(env, tmp_path):
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "diffu_lsp", "pull", "apple/DiffuCoder-7B-cpGRPO"], capture_output=True, text=True,
        timeout=120, env={**os.environ, "HF_HOME": str(tmp_path), **env})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffu-lsp: cannot download 'apple/DiffuCoder-7B-cpGRPO'"), out.stderr
    assert "Traceback" not in out.stderr and time.monotonic() - started < 60


def test_doctor_shows_what_it_asked_and_says_what_the_bundled_model_is_for():
    out = subprocess.run([sys.executable, "-m", "diffu_lsp", "doctor", "--device", "cpu"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "complete `def subtract(a, b): return |`" in out.stdout and "  came back   '" in out.stdout
    assert "try every mechanism offline" in out.stdout and "Choosing a model" in out.stdout
