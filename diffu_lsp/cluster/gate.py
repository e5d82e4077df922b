"""The cluster's door: an ASGI middleware that Ray Serve's HTTP proxy runs on every request before
the request is routed to a replica (Serve's proxy callback, ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
= diffu_lsp.cluster.gate.middlewares``, set by ``cluster start``).

- A request without the cluster token gets 401 here: an unauthenticated flood costs the proxy a
  header check, and no replica sees it.
- A body is read here, whole, within :data:`BODY_SECONDS` and at most :data:`MAX_BODY` bytes
  (else 408 or 413), and only then handed on: a client that never sends its body holds no
  replica slot.

The token is read from the owner-only file named by ``DIFFU_LSP_CLUSTER_TOKEN_FILE`` (again when
the file changes). The replica checks the token and the body deadline too, for a Ray cluster that
``cluster start`` did not start, whose proxy may run without this door.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from . import authorized, read_token
from ..errors import ClusterUnavailable

TOKEN_FILE_ENV = "DIFFU_LSP_CLUSTER_TOKEN_FILE"
CALLBACK = "diffu_lsp.cluster.gate.middlewares"
BODY_SECONDS = 10.0
MAX_BODY = 16 * 1024 * 1024  # as the daemon's frames


def middlewares() -> list:
    """Serve's proxy callback: the middlewares its HTTP proxy applies."""
    from starlette.middleware import Middleware

    path = os.environ.get(TOKEN_FILE_ENV, "")
    if not path:
        raise ClusterUnavailable(f"{TOKEN_FILE_ENV} is not set: the proxy has no token to check")
    read_token(path)  # fail closed: a proxy with no usable token does not start
    return [Middleware(Gate, token_file=path)]


class Gate:
    def __init__(self, app, token_file: str):
        self.app = app
        self.token_file = token_file
        self._token: tuple[tuple, str] = ((), "")

    def token(self) -> str:
        """The token file's current content (re-read when the file changed); "" if it is unusable."""
        try:
            info = os.stat(self.token_file)
            key = (info.st_ino, info.st_mtime_ns, info.st_size)
            if key != self._token[0]:
                self._token = (key, read_token(self.token_file))
        except (OSError, ClusterUnavailable):
            return ""
        return self._token[1]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # no websockets here
            return await send({"type": "websocket.close", "code": 1008})
        headers = dict(scope.get("headers") or [])
        if not authorized(headers.get(b"authorization", b"").decode("latin-1"), self.token()):
            return await answer(send, 401, "missing or wrong token")
        try:
            if int(headers.get(b"content-length", b"0")) > MAX_BODY:
                return await answer(send, 413, f"a body is at most {MAX_BODY} bytes")
        except ValueError:
            return await answer(send, 400, "bad Content-Length")
        chunks, size, more = [], 0, True
        deadline = time.monotonic() + BODY_SECONDS
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except (asyncio.TimeoutError, TimeoutError):
                return await answer(send, 408, f"the body did not arrive within {BODY_SECONDS:g} s")
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY:
                return await answer(send, 413, f"a body is at most {MAX_BODY} bytes")
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay():  # the whole body once, then the client's own messages (its disconnect)
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def answer(send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

