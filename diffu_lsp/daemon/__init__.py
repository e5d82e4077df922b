"""One warm model per machine and user: the model daemon and how servers find it.

Every editor window starts its own ``diffu-lsp``; they all send their model jobs to one daemon
process that holds the loaded model(s) (``host.py``) over a Unix domain socket in the user's
runtime folder (``$XDG_RUNTIME_DIR/diffu-lsp``, else ``<tmp>/diffu-lsp-<uid>``), a 0700 folder
holding a 0600 socket. The first server that needs a model starts the daemon (detached, logging
to ``daemon.log`` there); racing starters serialise on ``start.lock`` and the daemon itself holds
``daemon.lock`` for its whole life, so there is never more than one.

Nothing planted by another user is trusted: the folder is used only if it is a real directory
(not a symlink) of ours with mode 0700 (it is never chmod-ed into shape); every file in it is
opened with ``O_NOFOLLOW`` and must be ours; the peer at the other end of the socket must run as
our uid (``SO_PEERCRED``), and a pid is signalled only if its process is our daemon.

Files in the runtime folder: ``daemon.sock``, ``daemon.lock`` (holds the daemon's pid),
``standby.lock`` (the pid of the daemon's standby, ``standby.py``), ``start.lock``, ``daemon.log``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import DaemonUnavailable
from ..ownership import open_owned


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
    def standby_lock(self) -> Path:
        return self.folder / "standby.lock"

    @property
    def log(self) -> Path:
        return self.folder / "daemon.log"


def runtime_paths() -> Paths:
    """The runtime folder, created owner-only if missing; a DaemonUnavailable if it cannot be ours."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(base) / "diffu-lsp" if base else Path(tempfile.gettempdir()) / f"diffu-lsp-{os.getuid()}"
    private_folder(folder)
    return Paths(folder)


def private_folder(folder: Path) -> None:
    """Make ``folder`` (mode 0700) or check that the one there is a real folder of ours with mode
    0700; anything else is refused, never repaired."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass
        info = os.lstat(folder)
    except OSError as error:  # XDG_RUNTIME_DIR=/dev/null, a folder that vanished, no permission, ...
        raise DaemonUnavailable(f"cannot use the runtime folder {folder}: {error.strerror or error}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise DaemonUnavailable(f"{folder} is not a folder (a symlink or a file); refusing to use it")
    if info.st_uid != os.getuid():
        raise DaemonUnavailable(f"{folder} is not a folder of this user's; refusing to put the daemon's socket there")
    if stat.S_IMODE(info.st_mode) != 0o700:
        raise DaemonUnavailable(f"{folder} has mode {stat.S_IMODE(info.st_mode):o}, not 700: another user may have "
                                "put files there; refusing to use it (remove it and the next window makes a new one)")


def open_private(path: Path, flags: int = os.O_RDWR | os.O_CREAT) -> int:
    """A file descriptor for ``path`` in the runtime folder: never through a symlink, and only a
    regular file of ours (a file planted by another user is refused)."""
    return open_owned(path, flags, DaemonUnavailable)


def check_socket_file(path: Path) -> None:
    """The socket must be a socket of ours before anything is sent over it."""
    info = os.lstat(path)
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        raise DaemonUnavailable(f"{path} is not a socket of this user's; refusing to connect")


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a connected Unix socket (Linux SO_PEERCRED;
    elsewhere getpeereid's uid, pid 0)."""
    if hasattr(socket, "SO_PEERCRED"):
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
        return pid, uid
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if libc.getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        raise OSError(ctypes.get_errno(), "getpeereid failed")
    return 0, uid.value


def is_our_daemon(pid: int) -> bool:
    """Whether process ``pid`` runs as our uid and is a ``diffu_lsp daemon run``."""
    try:
        if Path("/proc").is_dir():
            uid = os.stat(f"/proc/{pid}").st_uid
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            command = [a.decode(errors="replace") for a in argv]
        else:
            out = subprocess.run(["ps", "-o", "uid=,command=", "-p", str(pid)], capture_output=True, text=True,
                                 timeout=5).stdout.split()
            uid, command = int(out[0]), out[1:]
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return False
    joined = " ".join(command)
    return uid == os.getuid() and "diffu_lsp" in joined and "daemon run" in joined


def cpu_seconds(pid: int) -> float | None:
    """CPU time process ``pid`` has used (Linux /proc), None where unknown: a frozen process's stays put."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def daemon_pid(paths: Paths) -> int | None:
    """The pid written in the lock file, if a process still holds the lock."""
    return lock_holder(paths.lock)


def standby_pid(paths: Paths) -> int | None:
    """The pid of the daemon's standby waiting in the folder (``standby.py``), if one waits."""
    return lock_holder(paths.standby_lock)


def lock_holder(path: Path) -> int | None:
    """The pid written in the lock file ``path``, if a process still holds the lock."""
    try:
        fd = open_private(path, os.O_RDWR)
    except DaemonUnavailable:
        return None
    with os.fdopen(fd, "r+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = file.read().strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(file, fcntl.LOCK_UN)
        return None


def wait_until_gone(paths: Paths, pid: int, timeout: float) -> bool:
    """Wait until the daemon ``pid`` no longer holds the lock; False if it still does at the timeout."""
    deadline = time.monotonic() + timeout
    while daemon_pid(paths) == pid:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def terminate(paths: Paths, timeout: float = 30.0, sig: int = signal.SIGTERM, pid: int | None = None) -> int | None:
    """Signal the daemon holding the lock (whatever version it is; only if its pid is ``pid``, when
    given) and wait for it to go; its pid, or None when none runs. Only a pid whose process is our
    daemon is ever signalled."""
    holder = daemon_pid(paths)
    if holder is None or (pid is not None and holder != pid) or not is_our_daemon(holder):
        return None
    pid = holder
    os.kill(pid, sig)
    if sig == signal.SIGKILL:
        os.kill(pid, signal.SIGCONT)  # a frozen process dies only once it runs again
    wait_until_gone(paths, pid, timeout)
    return pid


@contextmanager
def file_lock(path: Path, timeout: float):
    """An exclusive flock on ``path``, waited for up to ``timeout`` seconds."""
    fd = open_private(path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DaemonUnavailable(f"timed out waiting for {path}") from None
                time.sleep(0.02)
        yield fd
    finally:
        os.close(fd)  # closing releases the lock


def spawn(paths: Paths, *, idle_seconds: int, memory_mb: int) -> subprocess.Popen:
    """Start ``diffu-lsp daemon run`` detached (own session, no terminal), logging to the log file
    (the previous log is kept as ``daemon.log.1`` once it passes 5 MB)."""
    try:
        if os.lstat(paths.log).st_size > 5_000_000:
            paths.log.replace(paths.log.with_suffix(".log.1"))
    except FileNotFoundError:
        pass
    log = os.fdopen(open_private(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "ab", buffering=0)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "diffu_lsp", "daemon", "run",
             "--idle-seconds", str(idle_seconds), "--memory-mb", str(memory_mb)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True, cwd="/")
    finally:
        log.close()


def log_tail(paths: Paths, lines: int = 5) -> str:
    try:
        with os.fdopen(open_private(paths.log, os.O_RDONLY), errors="replace") as file:
            return " | ".join(file.read().strip().splitlines()[-lines:])
    except (OSError, DaemonUnavailable):
        return ""
