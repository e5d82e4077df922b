"""Files only this user may have made: the daemon's runtime files and the cluster's token files.

One check for both (SECURITY.md): a file is opened without following a symlink and without
blocking on a FIFO, and then the file opened (not the name looked at) must be a regular file of
this user's; a secret (``private``) must also be readable and writable by no one else.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import DiffuError


def open_owned(path: Path, flags: int, error: type[DiffuError], *, private: bool = False) -> int:
    """A descriptor for ``path`` opened with ``flags`` (a file it creates is 0600). ``error``, with
    a message that names the path and says why, for a symlink, a FIFO, a device or a folder,
    another user's file and, with ``private``, a file with any permission for group or others."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as failure:
        why = "it is a symlink" if failure.errno == errno.ELOOP else failure.strerror or str(failure)
        raise error(f"cannot open {path}: {why}; refusing to use it") from None
    info = os.fstat(fd)  # the file opened, not the name looked at
    why = ("it is not a regular file" if not stat.S_ISREG(info.st_mode)
           else "it is not this user's" if info.st_uid != os.getuid()
           else f"it has mode {stat.S_IMODE(info.st_mode):o}: open to others (chmod 600 it)"
           if private and stat.S_IMODE(info.st_mode) & 0o077 else "")
    if why:
        os.close(fd)
        raise error(f"cannot open {path}: {why}; refusing to use it")
    if not flags & os.O_NONBLOCK:
        os.set_blocking(fd, True)
    return fd
