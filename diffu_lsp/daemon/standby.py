"""The daemon's standby: a fork of the daemon, with torch and the model code imported, that waits
for the daemon's lock and takes the daemon's place the moment it dies (#31).

A new daemon process spends most of a restart importing torch and transformers (about 3 s of
CPU time, 85-90 % of the recovery from a killed daemon, measured). So a daemon, once it has
imported them and before it starts any thread, forks a standby, which blocks on ``daemon.lock``.
When the daemon is killed (or frozen, and then killed by a window) the kernel frees its lock, the
standby takes it, forks the next standby and serves: the windows reconnect to it and it loads the
model (the standby never holds a model: no second copy of a big model, no GPU memory). A daemon
that stops on purpose (``daemon stop``, idle, its folder taken) stops its standby first.

The standby shares its memory with the daemon copy-on-write (``gc.freeze`` keeps the collector off
those pages): about 20 MiB of its own, measured (the daemon's PSS and the standby's together 323
MiB against 304 for a daemon alone, the bundled model loaded and 30 jobs run). Its
``/proc/PID/comm`` is ``diffu-standby`` until it takes over; ``standby.lock`` holds its pid
(``standby_pid``); at most one standby waits. Linux only (a fork after importing torch is not safe
on macOS).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import signal
import sys
import time
from pathlib import Path

from ..errors import DaemonUnavailable
from . import Paths, open_private

log = logging.getLogger("diffu_lsp.daemon")

NAME = "diffu-standby"  # /proc/PID/comm of a waiting standby
RETRY_SECONDS = 0.05   # how often a stopping daemon looks whether its standby is gone
IDLE_SECONDS = 60.0    # a standby that took over exits if no window comes in this long (nobody needed it)


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def fork(paths: Paths, lock_fd: int) -> tuple[int, int | None]:
    """Fork a standby (unless one waits already): returns (the ``daemon.lock`` descriptor, the
    standby's pid or None) in the process that goes on to serve. In the standby this returns only
    once it holds the daemon's lock (the daemon died), with the pid of the next standby it forked.
    Call it with no thread started: the child has only the calling thread."""
    standby_fd = take_standby_lock(paths) if supported() else None
    if standby_fd is None:
        return lock_fd, None
    gc.freeze()  # the imported modules' pages stay shared with the standby
    while True:
        try:
            pid = os.fork()
        except OSError as error:  # out of memory or processes: serve without a standby
            log.warning("no standby: %s", error)
            os.close(standby_fd)
            return lock_fd, None
        if pid:  # the daemon: the standby holds standby.lock from now on
            os.close(standby_fd)
            return lock_fd, pid
        os.close(lock_fd)  # the daemon's lock is held by the daemon's descriptor, not this copy
        lock_fd = wait_for_lock(paths, standby_fd)
        log.info("the model daemon is gone: its standby (pid %d) takes over", os.getpid())
        if not same_file(standby_fd, paths.standby_lock):  # the folder was deleted and taken back meanwhile
            os.close(standby_fd)
            standby_fd = take_standby_lock(paths)
            if standby_fd is None:
                return lock_fd, None
        # and forks the next standby, which inherits standby.lock (held throughout)


def take_standby_lock(paths: Paths) -> int | None:
    """``standby.lock``, held; None when another standby holds it (or it cannot be had)."""
    try:
        fd = open_private(paths.standby_lock)
    except DaemonUnavailable as error:
        log.warning("no standby: %s", error)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: a standby waits already
        os.close(fd)
        return None
    return fd


def wait_for_lock(paths: Paths, standby_fd: int) -> int:
    """In the standby: block until the daemon is gone, then hold its lock; the descriptor, with our
    pid written in it. A standby whose folder was deleted meanwhile takes the lock of the folder
    taken back if that one is free, else exits: the folder is another daemon's now (or nobody's)."""
    os.ftruncate(standby_fd, 0)
    os.pwrite(standby_fd, f"{os.getpid()}\n".encode(), 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a Ctrl-C at a foreground `daemon run` ends it quietly
    comm, name = Path("/proc/self/comm"), None
    with contextlib.suppress(OSError):
        name = comm.read_text().strip()
        comm.write_text(NAME)
    try:
        fd = open_private(paths.lock)
        fcntl.flock(fd, fcntl.LOCK_EX)  # until the daemon is gone (SIGTERM ends the wait: a stop)
        if not same_file(fd, paths.lock):
            os.close(fd)
            fd = open_private(paths.lock)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (DaemonUnavailable, OSError) as error:
        log.info("the standby (pid %d) exits: the runtime folder is not its daemon's any more (%s)", os.getpid(),
                 error)
        os._exit(0)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if name is not None:
        with contextlib.suppress(OSError):
            comm.write_text(name)
    return fd


def same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is the file at ``path`` now (an open file's inode is never reused)."""
    try:
        now, held = os.lstat(path), os.fstat(fd)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def stop(pid: int | None, timeout: float = 5.0) -> None:
    """Stop our standby (a child of this process, so its pid cannot have been reused) and reap it:
    SIGTERM, then SIGKILL after ``timeout``; given up on after another ``timeout``."""
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError, ChildProcessError):
        os.kill(pid, signal.SIGTERM)
        for then in (signal.SIGKILL, None):
            deadline = time.monotonic() + timeout
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    break
                time.sleep(RETRY_SECONDS)
            else:
                return
            if then is not None:
                os.kill(pid, then)
