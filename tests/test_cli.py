"""The command line, run as a user runs it: a subprocess on real files with the bundled model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "diffu_lsp" / "assets" / "example.py"


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "diffu_lsp", *args], capture_output=True, text=True, timeout=timeout)


def test_complete_prints_a_suggestion_from_the_bundled_model():
    done = run("complete", f"{EXAMPLE}:7:9", "--block", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["text"].strip(), answer
    assert answer["model"].endswith("tiny-dream") and answer["forwards"] >= 1
    assert answer["multiline"] is True and answer["hole_tokens"] == 96


def test_complete_plain_output_is_the_text():
    done = run("complete", f"{EXAMPLE}:7:9", "--max-tokens", "8", "--alg", "entropy", "--steps", "4")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@pytest.mark.parametrize("location, message", [
    ("/nonexistent/file.py:1:1", "no such file"),
    (f"{EXAMPLE}:999:1", "line 999 is out of range"),
    (f"{EXAMPLE}:1:500", "column 500 is out of range"),
    (f"{EXAMPLE}", "expected FILE:LINE:COL"),
])
def test_bad_locations_are_one_line_errors(location, message):
    done = run("complete", location)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_binary_file_and_bad_model_are_one_line_errors(tmp_path):
    binary = tmp_path / "blob.py"
    binary.write_bytes(b"\x7fELF\x00\x00\x01")
    done = run("complete", f"{binary}:1:1")
    assert done.returncode == 2 and "binary" in done.stderr
    done = run("complete", f"{EXAMPLE}:1:1", "--model", str(tmp_path))
    assert done.returncode == 2 and "supported formats" in done.stderr and "Traceback" not in done.stderr


def test_doctor_reports_the_model_and_a_timed_job():
    done = run("doctor")
    assert done.returncode == 0, done.stderr
    assert "family        dream" in done.stdout
    assert "forwards for" in done.stdout


def test_complete_fits_a_long_file_to_a_small_model_window(random_dream, tmp_path):
    # 512 positions; default budgets (768 before, 256 after, 96-token block) would overflow them:
    # `complete` goes through the server's job path, which fits the canvas (a traceback before).
    long_file = tmp_path / "long.py"
    long_file.write_text("".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(400)))
    done = run("complete", f"{long_file}:599:5", "--block", "--json", "--model", str(random_dream), "--device", "cpu",
               "--dtype", "float32")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert json.loads(done.stdout)["hole_tokens"] == 96


def test_output_into_a_closed_pipe_exits_quietly():
    """`diffu-lsp ... | head -1` closes the pipe early: no BrokenPipeError traceback (#31)."""
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before anything is written
    done = subprocess.run([sys.executable, "-m", "diffu_lsp", "complete", f"{EXAMPLE}:7:9", "--block", "--json"],
                          stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(writer)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 141
