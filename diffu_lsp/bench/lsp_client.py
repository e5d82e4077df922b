"""A minimal LSP client over a subprocess's stdio (JSON-RPC 2.0 with Content-Length framing).

Enough to act as an editor for the benchmarks: requests with futures, notifications, cancel,
server-to-client requests answered with null/empty, and the arrival time of every response
(`time.perf_counter()` when its bytes were parsed) kept with it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import LspRequestFailed


def server_command(model: str | None = None, device: str | None = None, dtype: str | None = None) -> list[str]:
    """The real server, started through the CLI's entry point (what `diffu-lsp` runs)."""
    args = []
    if model:
        args += ["--model", str(model)]
    if device:
        args += ["--device", device]
    if dtype:
        args += ["--dtype", dtype]
    return [sys.executable, "-c", "import sys; from diffu_lsp.cli import main; sys.exit(main(sys.argv[1:]))", *args]


@dataclass
class Response:
    id: int
    method: str
    sent: float
    received: float
    result: Any = None
    error: dict | None = None


@dataclass
class LspClient:
    command: list[str]
    env: dict | None = None
    process: asyncio.subprocess.Process | None = None
    _next_id: int = 0
    _pending: dict = field(default_factory=dict)
    _sent: dict = field(default_factory=dict)
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=60))
    notifications: list = field(default_factory=list)
    started_at: float = 0.0
    _tasks: list = field(default_factory=list)
    unexpected_responses: int = 0  # responses whose id has no pending request (a second answer, an unknown id)

    async def start(self) -> None:
        self.started_at = time.perf_counter()
        self.process = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self.env or dict(os.environ), limit=1 << 24)
        self._tasks = [asyncio.ensure_future(self._read_stdout()), asyncio.ensure_future(self._read_stderr())]

    @property
    def pid(self) -> int:
        return self.process.pid

    # ------------------------------------------------------------ writing

    def _write(self, message: dict) -> None:
        body = json.dumps(message, separators=(",", ":")).encode()
        self.process.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    async def drain(self) -> None:
        await self.process.stdin.drain()

    def send_request(self, method: str, params: Any = None) -> tuple[int, asyncio.Future]:
        """Send without waiting; returns (id, future of Response)."""
        self._next_id += 1
        request_id = self._next_id
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._sent[request_id] = (method, time.perf_counter())
        self._write({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        return request_id, future

    async def request(self, method: str, params: Any = None, timeout: float | None = 120.0) -> Any:
        _, future = self.send_request(method, params)
        await self.drain()
        response = await asyncio.wait_for(self._guard(future), timeout)
        if response.error:
            raise LspRequestFailed(f"{method}: {response.error.get('message')} ({response.error.get('code')})")
        return response.result

    async def _guard(self, future):
        """Wait for the future, but fail with the server's stderr if it dies first."""
        waiter = asyncio.ensure_future(self.process.wait())
        try:
            done, _ = await asyncio.wait({future, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if future in done:
                return future.result()
            raise LspRequestFailed(f"the server exited with status {self.process.returncode}:\n" + "\n".join(self.stderr_tail))
        finally:
            waiter.cancel()

    def notify(self, method: str, params: Any = None) -> None:
        self._write({"jsonrpc": "2.0", "method": method, "params": params})

    def cancel(self, request_id: int) -> None:
        self.notify("$/cancelRequest", {"id": request_id})

    # ------------------------------------------------------------ reading

    async def _read_stdout(self) -> None:
        reader = self.process.stdout
        try:
            while True:
                length = None
                while True:
                    line = await reader.readline()
                    if not line:
                        return
                    line = line.strip()
                    if not line:
                        break
                    name, _, value = line.decode("ascii", "replace").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                if length is None:
                    continue
                message = json.loads(await reader.readexactly(length))
                self._dispatch(message, time.perf_counter())
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async def _read_stderr(self) -> None:
        while True:
            line = await self.process.stderr.readline()
            if not line:
                return
            self.stderr_tail.append(line.decode("utf-8", "replace").rstrip())

    def _dispatch(self, message: dict, received: float) -> None:
        if "method" in message and "id" in message:  # a request from the server
            self._answer_server_request(message)
        elif "method" in message:
            self.notifications.append((received, message["method"], message.get("params")))
        elif "id" in message:
            future = self._pending.pop(message["id"], None)
            method, sent = self._sent.pop(message["id"], ("?", received))
            if future is None:
                self.unexpected_responses += 1
            elif not future.done():
                future.set_result(Response(message["id"], method, sent, received,
                                           message.get("result"), message.get("error")))

    def _answer_server_request(self, message: dict) -> None:
        method, params = message["method"], message.get("params") or {}
        if method == "workspace/configuration":
            result: Any = [None] * len(params.get("items", []))
        elif method in ("workspace/workspaceFolders",):
            result = []
        elif method == "workspace/applyEdit":  # declined: the bench's documents stay as it typed them
            result = {"applied": False, "failureReason": "the bench client applies no edits"}
        else:  # window/workDoneProgress/create, client/registerCapability, window/showMessageRequest ...
            result = None
        self._write({"jsonrpc": "2.0", "id": message["id"], "result": result})

    # ------------------------------------------------------------ lifecycle

    async def initialize(self, root_uri: str | None = None, options: dict | None = None) -> dict:
        capabilities = {
            "textDocument": {
                "synchronization": {"dynamicRegistration": False, "didSave": False},
                "inlineCompletion": {"dynamicRegistration": False},
                "completion": {"completionItem": {"snippetSupport": False}},
            },
            "workspace": {"configuration": True, "workspaceFolders": False},
            "window": {"workDoneProgress": True},
            "general": {"positionEncodings": ["utf-16"]},
        }
        result = await self.request("initialize", {
            "processId": os.getpid(), "rootUri": root_uri, "capabilities": capabilities,
            "initializationOptions": options or {}, "clientInfo": {"name": "diffu-lsp-bench"},
        }, timeout=600)
        self.notify("initialized", {})
        await self.drain()
        return result

    async def close(self, timeout: float = 20.0) -> None:
        if self.process is None:
            return
        try:
            if self.process.returncode is None:
                await self.request("shutdown", None, timeout=timeout)
                self.notify("exit", None)
                await self.drain()
                await asyncio.wait_for(self.process.wait(), timeout)
        except (asyncio.TimeoutError, LspRequestFailed, ConnectionError, BrokenPipeError):
            pass
        finally:
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
            for task in self._tasks:
                task.cancel()


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM (peak resident set) of a live process, Linux only."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
