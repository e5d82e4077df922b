"""The model engine as a Ray Serve application that many editors share.

``diffu-lsp cluster start`` starts (or joins, ``--address``) a Ray cluster and deploys
:mod:`.app` on it: N replicas, each with a warm model, behind Ray Serve's HTTP proxy on
``--host``/``--port``. Two secrets, each in an owner-only (0600) file in the user's config folder:
the cluster token (``cluster-token``, new at every start), which every HTTP request must carry and
which team members copy; and Ray's own token (``ray-token``, made once, never leaves the head
unless the operator copies it to another Ray node), which Ray's token authentication asks of every
Ray connection. A server with the setting ``engine`` set to the cluster's URL sends its jobs there
(:class:`.client.ClusterEngine`); ``cluster stop`` deletes the application and, if ``start``
started the Ray head, stops Ray.

Nothing here imports ray at module level: the server imports only :mod:`.client`.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import ClusterUnavailable
from ..ownership import open_owned
from ..settings import user_config_file

DEFAULT_PORT = 8270
TOKEN_BYTES = 4096  # a token file is a line; anything bigger is not one


def config_folder() -> Path:
    return user_config_file().parent


def token_file() -> Path:
    return config_folder() / "cluster-token"


def state_file() -> Path:
    return config_folder() / "cluster.json"


def ray_token_file() -> Path:
    return config_folder() / "ray-token"


def ray_token() -> Path:
    """Ray's own token file (RAY_AUTH_TOKEN_PATH of every Ray process ``cluster start`` starts):
    made once, owner-only; an existing one is used only if :func:`read_token` accepts it."""
    path = ray_token_file()
    if not os.path.lexists(path):
        new_token(path, secrets.token_hex(32))
    read_token(path)
    return path


def new_token(path: Path | None = None, token: str | None = None) -> str:
    """A fresh random token written owner-only (the file is created 0600, never chmod-ed after)."""
    path = path or token_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = token or secrets.token_urlsafe(32)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    os.replace(tmp, path)
    return token


def read_token(path: Path | str | None = None) -> str:
    """The token in ``path`` (default: this user's token file). A ClusterUnavailable, saying why, unless
    it is a regular file (not a symlink, FIFO or device) owned by this user and readable by no one
    else (mode 0600 or 0400)."""
    path = Path(path).expanduser() if path else token_file()
    with os.fdopen(open_owned(path, os.O_RDONLY, ClusterUnavailable, private=True), "rb") as file:
        return file.read(TOKEN_BYTES).decode(errors="replace").strip()


def authorized(header: str, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` as a bearer token (compared in constant time)."""
    scheme, _, given = header.partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def same_url(a: str, b: str) -> bool:
    """Whether two engine URLs name the same endpoint (scheme, host, port, path)."""
    def key(url: str) -> tuple:
        parts = urlsplit(url.strip())
        try:
            port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        except ValueError:
            return (url,)
        return parts.scheme.lower(), (parts.hostname or "").lower(), port, parts.path.rstrip("/")
    return key(a) == key(b)


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
