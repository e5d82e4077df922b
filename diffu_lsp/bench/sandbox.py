"""Run untrusted generated programs: a fresh isolated interpreter, a time limit, resource limits,
an empty environment and no network.

- `python -I` (isolated: no user site, no PYTHON* variables, no cwd on sys.path), env = {} (`env -i`),
  a fresh temporary working directory, its own session (the whole process group is killed on time out);
- in the child, before the program runs: RLIMIT_CPU (time limit + 1 s), RLIMIT_AS 2 GiB,
  RLIMIT_FSIZE 16 MiB, RLIMIT_CORE 0, and socket creation replaced by a function that raises;
- where the kernel allows it, `unshare -rn` also puts the child in an empty network namespace.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

RUNNER = r"""
import resource, socket, sys
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_CPU, (limit, limit))
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the benchmark sandbox")
socket.socket = socket.create_connection = socket.getaddrinfo = socket.socketpair = _no_network
path = sys.argv[1]
sys.argv = [path]
with open(path, encoding="utf-8") as f:
    source = f.read()
del resource, socket, limit, f
exec(compile(source, path, "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


@lru_cache(maxsize=1)
def network_namespace_prefix() -> tuple[str, ...]:
    """("unshare", "-rn") where an unprivileged network namespace can be made here, else ()."""
    unshare = shutil.which("unshare")
    if not unshare:
        return ()
    for flags in ("-rn", "-n"):
        try:
            probe = subprocess.run([unshare, flags, sys.executable, "-c", "pass"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return (unshare, flags)
    return ()


def describe() -> str:
    net = "empty network namespace (`unshare " + network_namespace_prefix()[1] + "`) + " \
        if network_namespace_prefix() else ""
    return (f"`python -I` with an empty environment in a temporary directory, {net}sockets disabled, "
            "RLIMIT_CPU/AS(2 GiB)/FSIZE limits, wall-clock time limit with the process group killed")


def run_program(source: str, timeout: float = 5.0) -> tuple[bool, str]:
    """(passed, reason): passed = exit status 0 within `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="diffu-bench-") as work:
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        command = [*network_namespace_prefix(), sys.executable, "-I", "-c", RUNNER, path, str(int(timeout) + 1)]
        process = subprocess.Popen(command, cwd=work, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.communicate()
            return False, "timeout"
        if process.returncode == 0:
            return True, ""
        lines = err.decode("utf-8", "replace").strip().splitlines()
        return False, lines[-1][:200] if lines else f"exit status {process.returncode}"


def run_many(sources: list[str], timeout: float = 5.0, workers: int | None = None) -> dict[str, tuple[bool, str]]:
    """Each distinct source run once; {source: (passed, reason)}."""
    unique = list(dict.fromkeys(sources))
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda s: run_program(s, timeout), unique))
    return dict(zip(unique, results))
