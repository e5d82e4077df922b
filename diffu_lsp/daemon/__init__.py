"""One warm model per machine and user: the model daemon and how servers find it.

Every editor window starts its own ``diffu-lsp``; they all send their model jobs to one daemon
process that holds the loaded model(s) (``host.py``) over a Unix domain socket in the user's
runtime folder (``$XDG_RUNTIME_DIR/diffu-lsp``, else ``<tmp>/diffu-lsp-<uid>``), a 0700 folder
holding a 0600 socket. The first server that needs a model starts the daemon (detached, logging
to ``daemon.log`` there); racing starters serialise on ``start.lock`` and the daemon itself holds
``daemon.lock`` for its whole life, so there is never more than one.

Files in the runtime folder: ``daemon.sock``, ``daemon.lock`` (holds the daemon's pid),
``start.lock``, ``daemon.log``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class DaemonError(RuntimeError):
    """The daemon cannot be reached, started or used; the message says why, for the user."""


@dataclass(frozen=True)
class Paths:
    folder: Path

    @property
    def socket(self) -> Path:
        return self.folder / "daemon.sock"

    @property
    def lock(self) -> Path:
        return self.folder / "daemon.lock"

    @property
    def start_lock(self) -> Path:
        return self.folder / "start.lock"

    @property
    def log(self) -> Path:
        return self.folder / "daemon.log"


def runtime_paths() -> Paths:
    """The runtime folder, created owner-only if missing; refused if another user owns it."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(base) / "diffu-lsp" if base else Path(tempfile.gettempdir()) / f"diffu-lsp-{os.getuid()}"
    private_folder(folder)
    return Paths(folder)


def private_folder(folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise DaemonError(f"{folder} is not a folder of this user's; refusing to put the daemon's socket there")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(folder, 0o700)


def daemon_pid(paths: Paths) -> int | None:
    """The pid written in the lock file, if a process still holds the lock."""
    try:
        with open(paths.lock, "r+") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = file.read().strip()
                return int(text) if text.isdigit() else None
            fcntl.flock(file, fcntl.LOCK_UN)
            return None
    except FileNotFoundError:
        return None


def wait_until_gone(paths: Paths, pid: int, timeout: float) -> bool:
    """Wait until the daemon ``pid`` no longer holds the lock; False if it still does at the timeout."""
    deadline = time.monotonic() + timeout
    while daemon_pid(paths) == pid:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def terminate(paths: Paths, timeout: float = 30.0) -> int | None:
    """SIGTERM the daemon holding the lock (whatever version it is) and wait for it to go;
    its pid, or None when none runs."""
    pid = daemon_pid(paths)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        wait_until_gone(paths, pid, timeout)
    return pid


@contextmanager
def file_lock(path: Path, timeout: float):
    """An exclusive flock on ``path``, waited for up to ``timeout`` seconds."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DaemonError(f"timed out waiting for {path}") from None
                time.sleep(0.02)
        yield fd
    finally:
        os.close(fd)  # closing releases the lock


def spawn(paths: Paths, *, idle_seconds: int, memory_mb: int) -> subprocess.Popen:
    """Start ``diffu-lsp daemon run`` detached (own session, no terminal), logging to the log file
    (the previous log is kept as ``daemon.log.1`` once it passes 5 MB)."""
    try:
        if paths.log.stat().st_size > 5_000_000:
            paths.log.replace(paths.log.with_suffix(".log.1"))
    except FileNotFoundError:
        pass
    log = open(paths.log, "ab", buffering=0)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "diffu_lsp", "daemon", "run",
             "--idle-seconds", str(idle_seconds), "--memory-mb", str(memory_mb)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True, cwd="/")
    finally:
        log.close()


def log_tail(paths: Paths, lines: int = 5) -> str:
    try:
        return " | ".join(paths.log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
