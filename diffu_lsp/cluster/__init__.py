"""The model engine as a Ray Serve application that many editors share.

``diffu-lsp cluster start`` starts (or joins, ``--address``) a Ray cluster and deploys
:mod:`.app` on it: N replicas, each with a warm model, behind Ray Serve's HTTP proxy on
``--host``/``--port``. A random token is written owner-only (0600) to the user's config folder;
every request must carry it. A server with the setting ``engine`` set to the cluster's URL sends
its jobs there (:class:`.client.ClusterEngine`); ``cluster stop`` deletes the application and, if
``start`` started the Ray head, stops Ray.

Nothing here imports ray at module level: the server imports only :mod:`.client`.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

from ..errors import EngineUnavailable
from ..settings import user_config_file

DEFAULT_PORT = 8270


class ClusterError(EngineUnavailable, RuntimeError):
    """The cluster cannot be started, reached or used; the message says why, for the user."""


def config_folder() -> Path:
    return user_config_file().parent


def token_file() -> Path:
    return config_folder() / "cluster-token"


def state_file() -> Path:
    return config_folder() / "cluster.json"


def new_token(path: Path | None = None) -> str:
    """A fresh random token written owner-only (the file is created 0600, never chmod-ed after)."""
    path = path or token_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    os.replace(tmp, path)
    return token


def read_token(path: Path | str | None = None) -> str:
    """The token in ``path`` (default: this user's token file); a ClusterError if it is missing,
    not ours, or readable by others."""
    path = Path(path).expanduser() if path else token_file()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as error:
        raise ClusterError(f"cannot read the cluster token {path}: {error.strerror or error}") from None
    with os.fdopen(fd) as file:
        info = os.fstat(file.fileno())
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise ClusterError(f"{path} is readable by others or not this user's; refusing to use it "
                               "(chmod 600 it)")
        return file.read().strip()


def write_state(state: dict) -> None:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(state, file)


def read_state() -> dict:
    try:
        return json.loads(state_file().read_text())
    except (OSError, ValueError):
        return {}
