"""The cluster's secrets without a cluster (#24): which token file a server accepts, where this
machine's token may be sent, and the warning for a Ray cluster that runs without authentication.
The attacks on a running cluster are in tests/test_cluster.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import msgspec
import pytest

from diffu_lsp.cluster import new_token, read_token, write_state
from diffu_lsp.errors import ClusterUnavailable
from diffu_lsp.cluster.client import ClusterEngine
from diffu_lsp.job import Request
from diffu_lsp.scheduler import CancelToken
from diffu_lsp.settings import Settings

from test_runtime_security import OTHER

SAMPLE = "def f():\n    return \n"


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "diffu-lsp"


class Listener:
    """A socket that records the first request sent to it (and answers nothing)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.received = b""
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        try:
            conn, _ = self.sock.accept()
            conn.settimeout(5)
            while b"\r\n\r\n" not in self.received:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                self.received += chunk
            conn.close()
        except OSError:
            pass


def run(engine: ClusterEngine) -> None:
    engine.configure(msgspec.convert({"daemonDeadlineSeconds": 1.0, "engineTokenFile": engine.token_file}, Settings))
    engine.run(Request("suggest", SAMPLE, len(SAMPLE) - 1, len(SAMPLE) - 1, Settings()), CancelToken(), key="k")


def test_the_default_token_goes_only_to_the_cluster_started_here(config):
    """#24 finding 7: ~/.config/diffu-lsp/cluster-token is sent to the URL in this machine's
    cluster state and to no other engine URL."""
    token = new_token()
    ours, elsewhere = Listener(), Listener()
    write_state({"url": ours.url + "/", "started_head": True})
    with pytest.raises(ClusterUnavailable, match="goes only to the cluster started here"):
        run(ClusterEngine(elsewhere.url))
    time.sleep(0.2)
    assert token.encode() not in elsewhere.received
    with pytest.raises(Exception):  # the listener answers nothing: the job is lost, after sending
        run(ClusterEngine(ours.url))
    assert f"Bearer {token}".encode() in ours.received


def test_an_engine_token_file_must_be_an_owner_only_regular_file_of_ours(tmp_path):
    """#24 finding 7: engineTokenFile is read only if it is a regular file (not a symlink, FIFO or
    folder) owned by this user with mode 0600 or 0400; anything else is refused, saying why, and
    never blocks (a FIFO with no writer)."""
    good = tmp_path / "token"
    good.write_text("secret\n")
    good.chmod(0o600)
    assert read_token(good) == "secret"
    good.chmod(0o400)
    assert read_token(good) == "secret"
    good.chmod(0o600)

    link = tmp_path / "link"
    link.symlink_to(good)
    loose = tmp_path / "loose"
    loose.write_text("secret\n")
    loose.chmod(0o644)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    theirs = tmp_path / "theirs"
    theirs.write_text("secret\n")
    theirs.chmod(0o600)
    os.chown(theirs, OTHER, OTHER)
    for path, why in ((link, "is a symlink"), (loose, "mode 644"), (fifo, "not a regular file"),
                      (tmp_path, "not a regular file"), (theirs, "not this user's"),
                      (tmp_path / "missing", "cannot open")):
        started = time.monotonic()
        with pytest.raises(ClusterUnavailable, match=why):
            read_token(path)
        assert time.monotonic() - started < 1
        listener = Listener()
        with pytest.raises(ClusterUnavailable, match=why):
            run(ClusterEngine(listener.url, token_file=str(path)))
        time.sleep(0.1)
        assert b"secret" not in listener.received


def test_joining_a_ray_cluster_without_authentication_warns(config, monkeypatch):
    """#24 finding 1: `cluster start --address` to a Ray cluster that runs without token
    authentication says so (a real Ray head started with RAY_AUTH_MODE=disabled)."""
    from diffu_lsp.cluster import cli as cluster_cli

    from test_cluster import ray_processes

    if ray_processes():
        pytest.skip("a Ray cluster already runs on this machine")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"] = "disabled"
    port = 6391
    temp = tempfile.mkdtemp(prefix="dl-ray-")  # short: Ray's socket paths must fit 107 bytes
    started = subprocess.run(cluster_cli.ray_command() + ["start", "--head", f"--port={port}", "--num-cpus=1",
                                                          "--include-dashboard=false", "--disable-usage-stats",
                                                          f"--temp-dir={temp}"],
                             env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        deployed, warnings = [], []
        monkeypatch.setattr(cluster_cli, "driver", lambda state, action, **options: deployed.append(action) or {})
        cluster_cli.start(address=f"127.0.0.1:{port}", port=8277, warn=warnings.append)
        assert deployed == ["deploy"]
        assert len(warnings) == 1 and "has no authentication" in warnings[0], warnings
    finally:
        subprocess.run(cluster_cli.ray_command() + ["stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
