"""Attacks on the runtime folder by another local user (#17), each played by a real second uid:
the suite runs as root, so a forked child drops to ``nobody`` (65534) to plant its files. Each is
refused, the user is told once, and a window falls back to holding the model itself."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from diffu_lsp import __version__, protocol
from diffu_lsp.daemon import Paths, daemon_pid, private_folder, runtime_paths, standby_pid, terminate
from diffu_lsp.errors import DaemonUnavailable
from diffu_lsp.daemon.client import connect, connect_or_start

from test_daemon import alive, open_window, runtime, shown_messages, suggestion, open_doc, until_ready, wait_for  # noqa: F401

OTHER = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to play a second user")


def as_other_user(fn) -> int:
    """Fork; the child drops to uid/gid OTHER and runs fn(); returns the child's pid (not waited)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(OTHER)
            os.setuid(OTHER)
            fn()
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    return pid


def test_a_folder_not_ours_or_not_private_is_refused_and_never_repaired(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)  # ours, but anyone may have put files in it
    with pytest.raises(DaemonUnavailable, match="mode 777"):
        private_folder(loose)
    assert stat.S_IMODE(os.lstat(loose).st_mode) == 0o777  # not chmod-ed into shape
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, OTHER, OTHER)
    with pytest.raises(DaemonUnavailable, match="not a folder of this user's"):
        private_folder(theirs)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(DaemonUnavailable, match="symlink"):
        private_folder(link)
    with pytest.raises(DaemonUnavailable, match="cannot use the runtime folder"):
        private_folder(Path("/dev/null/diffu-lsp"))


def test_a_planted_fifo_in_the_runtime_folder_blocks_nothing(runtime):
    """The runtime folder's files are opened as the cluster's token files are (ownership.open_owned):
    a FIFO planted as daemon.log is refused at once; opening it for reading used to wait for a
    writer forever (log_tail, which the window calls when a daemon fails to start)."""
    import threading

    from diffu_lsp.daemon import log_tail

    os.mkfifo(runtime.log, 0o600)
    tails = []
    reader = threading.Thread(target=lambda: tails.append(log_tail(runtime)), daemon=True)
    reader.start()
    reader.join(5)
    assert tails == [""]


def test_planted_symlinks_are_not_followed(runtime, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    runtime.lock.symlink_to(victim)
    runtime.log.symlink_to(victim)
    with pytest.raises(DaemonUnavailable, match="cannot open"):
        connect_or_start(runtime)
    assert daemon_pid(runtime) is None
    assert victim.read_text() == "precious\n"  # neither truncated to a pid nor appended to


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the standby is a Linux fork")
def test_a_planted_standby_lock_symlink_is_not_followed(runtime, tmp_path):
    """SECURITY.md counts standby.lock among the files opened without following a link: the
    daemon then serves without a standby, and the file the link names keeps its contents (a
    standby writes its pid into its lock)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    private_folder(runtime.folder)
    runtime.standby_lock.symlink_to(victim)
    connect_or_start(runtime).close()
    time.sleep(1)  # a standby would have forked and written its pid by now
    assert daemon_pid(runtime) is not None and standby_pid(runtime) is None
    assert victim.read_text() == "precious\n"


def test_a_socket_of_another_user_gets_no_document(runtime):
    received = runtime.folder / "received"

    def listen() -> None:
        # The attacker's listener: the file is ours (bound before the uid drop) but the peer, who
        # listens after it (SO_PEERCRED reports the listener's credentials), is not.
        server.listen(1)
        os.write(ready_w, b"1")
        conn, _ = server.accept()
        conn.settimeout(5)
        try:
            data = conn.recv(1 << 16)
        except OSError:
            data = b""
        os.write(fd, data or b"-")

    fd = os.open(received, os.O_WRONLY | os.O_CREAT, 0o666)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(runtime.socket))
    server.settimeout(10)
    ready_r, ready_w = os.pipe()
    child = as_other_user(listen)
    server.close()
    assert os.read(ready_r, 1) == b"1"
    try:
        with pytest.raises(DaemonUnavailable, match="runs as uid 65534"):
            connect(runtime)
        os.waitpid(child, 0)
        assert Path(received).read_bytes() in (b"", b"-")  # not even the Hello went out
    finally:
        os.close(fd)
    # a socket file owned by another user is refused before connecting
    runtime.socket.unlink()
    planted = socket.socket(socket.AF_UNIX)
    planted.bind(str(runtime.socket))
    os.chown(runtime.socket, OTHER, OTHER)
    with pytest.raises(DaemonUnavailable, match="not a socket of this user's"):
        connect(runtime)
    planted.close()


def test_the_daemon_refuses_a_peer_of_another_uid(monkeypatch):
    base = Path(tempfile.mkdtemp(prefix="diffu-peer-", dir="/tmp"))  # a path the other user can walk
    os.chmod(base, 0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    paths = runtime_paths()
    good = connect_or_start(paths)
    try:
        os.chmod(paths.folder, 0o755)  # open the door for the test only: the peer check must hold alone
        os.chmod(paths.socket, 0o777)
        answer = base / "answer"
        fd = os.open(answer, os.O_WRONLY | os.O_CREAT, 0o666)

        def knock() -> None:
            raw = socket.socket(socket.AF_UNIX)
            raw.settimeout(10)
            raw.connect(str(paths.socket))
            try:  # the daemon may close before the hello is sent (a broken pipe): no Welcome either way
                raw.sendall(protocol.encode(protocol.Hello(protocol.PROTOCOL, __version__, os.getpid())))
                msg = protocol.read_frame(raw)
            except OSError:
                msg = None
            os.write(fd, type(msg).__name__.encode())

        child = as_other_user(knock)
        _, code = os.waitpid(child, 0)
        os.close(fd)
        assert code == 0 and answer.read_text() == "NoneType"  # closed without a Welcome
        assert good.status().clients == 0
    finally:
        os.chmod(paths.folder, 0o700)
        good.close()
        terminate(paths)
        shutil.rmtree(base, ignore_errors=True)


def test_daemon_stop_signals_only_our_daemon(runtime):
    # Another process holds the lock and names itself (or anyone) as the daemon.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(runtime.lock)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        f"os.write(fd, b'{bystander.pid}\\n')\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert daemon_pid(runtime) == bystander.pid
        assert terminate(runtime, timeout=2) is None
        stop = subprocess.run([sys.executable, "-m", "diffu_lsp", "daemon", "stop"], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime.folder.parent)})
        time.sleep(0.5)
        assert bystander.poll() is None and holder.poll() is None  # nobody was signalled
        assert stop.returncode != 0
    finally:
        bystander.kill()
        holder.kill()
        bystander.wait()
        holder.wait()


@pytest.mark.asyncio
async def test_a_window_with_a_planted_runtime_folder_falls_back_and_says_so_once(tmp_path):
    base = tmp_path / "run"
    base.mkdir()
    folder = base / "diffu-lsp"
    folder.mkdir()
    os.chmod(folder, 0o777)  # as another user's probe left it: anything inside may be theirs
    window = await open_window(Paths(folder), tmp_path, "planted")
    try:
        await until_ready(window)
        open_doc(window, "file:///f.py")
        assert await suggestion(window, "file:///f.py")
        assert (await window.request("diffu/stats"))["engine"] == "in-process"
        told = [m for m in shown_messages(window) if str(folder) in m]
        assert len(told) == 1 and "mode 777" in told[0]
        assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o777
    finally:
        await window.close()
