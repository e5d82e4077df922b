"""Workspace trust (issue #17): a cloned repository's diffu-lsp.toml may not choose the model,
device, engine or downloads unless the user trusts that folder; a hub id is never fetched unless
downloads are allowed. End-to-end through a real server process, plus the rules in-process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import threading
from pathlib import Path

import pytest
from lsprotocol import types as lsp

from diffu_lsp import configuration, server as server_mod
from diffu_lsp import settings as config
from tests.test_server import (SAMPLE, aio, end_of, inline, open_doc, start_server, stats, stop_server, until,
                               wait_status)


def broken_model(folder: Path) -> Path:
    """A folder that fails to load with a recognisable reason if the server ever tries it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "evil-diffusion"}))
    return folder


def warnings_about_trust(client) -> list[str]:
    return [m.message for m in client.messages if "not trusted" in m.message]


# ------------------------------------------------------------------ end to end


@aio
async def test_untrusted_workspace_cannot_choose_the_model(tmp_path):
    evil = broken_model(tmp_path / "elsewhere" / "evil-model")
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "diffu-lsp.toml").write_text(
        f'model = "{evil}"\ndevice = "cpu"\nallowDownload = true\nthreshold = 0.5\n')
    client = await start_server(tmp_path, "--no-daemon")
    try:
        ready = await wait_status(client, "ready")
        assert ready["model"] == "bundled tiny model"
        s = (await stats(client))["settings"]
        assert (s["model"], s["device"], s["allowDownload"], s["threshold"]) == (None, "auto", False, 0.5)
        (message,) = await until(lambda: warnings_about_trust(client), "one warning about the untrusted folder")
        assert "model" in message and "trustedWorkspaces" in message and str(tmp_path / "ws") in message
        uri = open_doc(client, SAMPLE)
        await inline(client, uri, end_of(SAMPLE))  # the window works with the bundled model
        assert len(warnings_about_trust(client)) == 1  # told once
        assert not [st for st in client.statuses if st["state"] == "error"]
    finally:
        await stop_server(client)


@aio
async def test_trusted_workspace_model_path_resolves_against_its_toml(tmp_path):
    broken_model(tmp_path / "ws" / "evil-model")
    (tmp_path / "ws" / "diffu-lsp.toml").write_text('model = "./evil-model"\n')
    user = tmp_path / "xdg" / "diffu-lsp" / "diffu-lsp.toml"
    user.parent.mkdir(parents=True)
    user.write_text(f'trustedWorkspaces = ["{tmp_path / "ws"}"]\n')
    client = await start_server(tmp_path, "--no-daemon")  # the server's cwd is not tmp_path/ws
    try:
        error = await wait_status(client, "error")  # honoured: it tried (and failed on) the workspace's folder
        assert error["model"] == str((tmp_path / "ws" / "evil-model").resolve())
        assert "evil-diffusion" in error["message"]
        assert not warnings_about_trust(client)
    finally:
        await stop_server(client)


class Listener:
    """A stand-in for an attacker's server on 127.0.0.1: records the bytes of each connection that
    reaches it (until the end of the request's headers) and answers 401."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.received: list[bytes] = []
        self.stopped = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            data = b""
            with conn:
                conn.settimeout(2)
                try:
                    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                        data += chunk
                    conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass
            self.received.append(data)

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


def secret_file(tmp_path: Path) -> Path:
    secret = tmp_path / "git-credentials"
    secret.write_text("https://me:hunter2@example.com\n")
    secret.chmod(0o600)  # as the cluster client demands of a token file
    return secret


@aio
async def test_a_trusted_workspace_toml_that_changes_is_ignored_until_trusted_again(tmp_path):
    """Finding 2 end to end: the editor trusted the workspace file's content (Neovim sends its SHA-256);
    a `git pull` then sets engine to an attacker's URL and engineTokenFile to a secret. The server
    ignores the change, says so once, and nothing reaches the URL; trusted again, the engine is
    used, but never with the workspace's token file."""
    (tmp_path / "ws").mkdir()
    toml = tmp_path / "ws" / "diffu-lsp.toml"
    toml.write_text('device = "cpu"\n')
    secret = secret_file(tmp_path)
    listener = Listener()
    client = await start_server(tmp_path, "--no-daemon", init_options={"workspaceTrusted": sha256(toml)})
    try:
        await wait_status(client, "ready")
        assert (await stats(client))["settings"]["device"] == "cpu"  # the content trusted is honoured

        toml.write_text(f'device = "cpu"\nengine = "{listener.url}"\nengineTokenFile = "{secret}"\n')

        def told():
            return [m.message for m in client.messages if "changed since you trusted it" in m.message]

        await until(lambda: told() or listener.received, "the server to read the changed file")
        await asyncio.sleep(2)  # room for a connection the change would make
        assert listener.received == []
        s = (await stats(client))["settings"]
        assert (s["engine"], s["engineTokenFile"], s["device"]) == ("daemon", "", "auto")
        (message,) = told()
        assert str(toml) in message and "engine" in message and ":trust" in message

        client.protocol.notify(server_mod.WORKSPACE_TRUST, {"workspaceTrusted": sha256(toml)})  # :trust again
        await until(lambda: listener.received, "the trusted engine to be used")
        assert b"hunter2" not in b"".join(listener.received)
        assert (await stats(client))["settings"]["engineTokenFile"] == ""
        assert len(told()) == 1
    finally:
        listener.close()
        await stop_server(client)


# ------------------------------------------------------------------ the rules, in-process


@pytest.fixture
def window(monkeypatch, tmp_path):
    ls = server_mod.DiffuServer(daemon=False)
    ls.shown_messages = []
    monkeypatch.setattr(ls, "show", lambda message, kind: ls.shown_messages.append(message))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and no network, whatever happens
    return ls


@pytest.mark.parametrize("model", ["/abs/evil-model", "attacker-org/evil-diffusion", "./evil-model"])
def test_workspace_model_is_ignored_unless_trusted(window, tmp_path, model):
    toml = tmp_path / "ws" / "diffu-lsp.toml"
    raw = {"model": model, "device": "cuda", "engine": "http://evil:1", "engineTokenFile": "/x",
           "trustedWorkspaces": ["/"], "threshold": 0.5}
    toml.parent.mkdir()
    toml.write_text("# the rules are about raw, not this text\n")  # only a real file can be trusted
    assert window.config.trusted_part("workspace", toml, raw) == {"threshold": 0.5}
    assert window.config.trusted_part("workspace", toml, raw) == {"threshold": 0.5}
    (message,) = window.shown_messages  # once per file
    for key in ("model", "device", "engine", "engineTokenFile", "trustedWorkspaces"):
        assert key in message

    window.config.trusted_part("user", tmp_path / "xdg" / "diffu-lsp.toml", {"trustedWorkspaces": [str(tmp_path)]})
    kept = window.config.trusted_part("workspace", toml, raw)
    assert "trustedWorkspaces" not in kept and kept["device"] == "cuda"
    assert "engineTokenFile" not in kept  # never from a workspace, trusted or not
    expected = str((tmp_path / "ws" / "evil-model").resolve()) if model.startswith("./") else model
    assert kept["model"] == expected


def test_editor_workspace_trust_is_honoured(window, tmp_path):
    (tmp_path / "diffu-lsp.toml").write_text('model = "org/m"\ndevice = "cpu"\n')
    window.config.workspace_trusted = True
    kept = window.config.trusted_part("workspace", tmp_path / "diffu-lsp.toml", {"model": "org/m", "device": "cpu"})
    assert kept == {"model": "org/m", "device": "cpu"} and not window.shown_messages


def test_user_toml_relative_model_resolves_against_its_folder(window, tmp_path):
    (tmp_path / "xdg" / "mine").mkdir(parents=True)
    kept = window.config.trusted_part("user", tmp_path / "xdg" / "diffu-lsp.toml", {"model": "mine"})
    assert kept == {"model": str(tmp_path / "xdg" / "mine")}


def test_hub_id_not_cached_is_not_downloaded(window):
    s = config.Settings(model="attacker-org/evil-diffusion")
    assert window.config.without_download(s).model is None  # the bundled model meanwhile
    assert window.config.without_download(s).model is None
    (message,) = window.shown_messages
    assert "not in the local Hugging Face cache" in message and "diffu-lsp pull" in message
    allowed = config.Settings(model="attacker-org/evil-diffusion", allow_download=True)
    assert window.config.without_download(allowed).model == "attacker-org/evil-diffusion"


def test_hub_id_in_the_cache_loads_from_its_snapshot(window, monkeypatch, tmp_path):
    snapshot = tmp_path / "snap"
    monkeypatch.setattr(configuration, "cached_snapshot", lambda hub_id: str(snapshot))
    assert window.config.without_download(config.Settings(model="org/model")).model == str(snapshot)
    assert not window.shown_messages


# ------------------------------------------------------------------ trust follows content (issue #24)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def workspace_files(tmp_path) -> dict[str, Path]:
    (tmp_path / "xdg").mkdir(exist_ok=True)
    (tmp_path / "ws").mkdir(exist_ok=True)
    return {"user": tmp_path / "xdg" / "diffu-lsp.toml", "workspace": tmp_path / "ws" / "diffu-lsp.toml"}


def test_content_trust_holds_only_for_the_content_trusted(window, tmp_path):
    """Finding 2, the rule: the editor's word (Neovim: the SHA-256 of what you :trust-ed) covers that
    content only. Each reload decides again: a changed file's protected keys are ignored, told once,
    until the editor trusts the new content."""
    files = workspace_files(tmp_path)
    toml = files["workspace"]
    toml.write_text('device = "cpu"\n')
    cfg = window.config
    cfg.set_editor_trust(sha256(toml))
    assert cfg.reload_files(files) and cfg.resolve().device == "cpu"

    toml.write_text('device = "cpu"\nengine = "http://127.0.0.1:9"\nthreshold = 0.5\n')  # a `git pull`
    assert cfg.reload_files(files)
    s = cfg.resolve()
    assert (s.engine, s.device, s.threshold) == ("daemon", "auto", 0.5)
    (message,) = window.shown_messages
    assert "changed since you trusted it" in message and "engine" in message and ":trust" in message
    assert not cfg.reload_files(files) and len(window.shown_messages) == 1  # read again: told once

    cfg.set_editor_trust(sha256(toml))  # trusted again (diffu/workspaceTrust)
    assert cfg.reload_files(files) and cfg.resolve().engine == "http://127.0.0.1:9"
    toml.write_text('engine = "http://127.0.0.1:10"\n')  # changed again: told again
    assert cfg.reload_files(files) and cfg.resolve().engine == "daemon"
    assert len(window.shown_messages) == 2


@pytest.mark.parametrize("trust", ["trustedWorkspaces", "editor folder trust", "editor content trust"])
def test_symlinked_workspace_toml_is_never_trusted(window, tmp_path, trust):
    """Finding 3: a workspace diffu-lsp.toml that links to a file outside the workspace does not get
    that file's (or that folder's) trust, however the user trusts; a link to a regular file inside
    the workspace does."""
    files = workspace_files(tmp_path)
    elsewhere = tmp_path / "elsewhere" / "diffu-lsp.toml"  # e.g. another project's, trusted there
    elsewhere.parent.mkdir()
    elsewhere.write_text('engine = "http://127.0.0.1:9"\n')
    files["workspace"].symlink_to(elsewhere)
    cfg = window.config
    if trust == "trustedWorkspaces":
        files["user"].write_text(f'trustedWorkspaces = ["{tmp_path}"]\n')  # covers ws and elsewhere
    else:
        cfg.set_editor_trust(True if trust == "editor folder trust" else sha256(elsewhere))
    cfg.reload_files(files)
    assert cfg.resolve().engine == "daemon"
    (message,) = window.shown_messages
    assert "outside the workspace" in message and str(elsewhere) in message

    inside = tmp_path / "ws" / "config" / "diffu.toml"  # a link inside the workspace is the file it names
    inside.parent.mkdir()
    inside.write_text(elsewhere.read_text())
    files["workspace"].unlink()
    files["workspace"].symlink_to(inside)
    if trust == "editor content trust":
        cfg.set_editor_trust(sha256(inside))
    cfg.reload_files(files)
    assert cfg.resolve().engine == "http://127.0.0.1:9"


def test_workspace_toml_that_is_not_a_regular_file_is_refused_without_blocking(window, tmp_path):
    """A workspace diffu-lsp.toml that is a FIFO is refused at once: reading one would wait for a
    writer forever (and it could never be trusted)."""
    files = workspace_files(tmp_path)
    os.mkfifo(files["workspace"])
    done = threading.Event()
    worker = threading.Thread(target=lambda: (window.config.reload_files(files), done.set()), daemon=True)
    worker.start()
    try:
        assert done.wait(10), "reading a FIFO blocked"
    finally:
        if not done.is_set():  # unblock the old code's read
            with open(files["workspace"], "wb"):
                pass
    (message,) = window.shown_messages
    assert "Not a regular file" in message


def test_a_token_file_goes_only_to_the_engine_set_beside_it(window, tmp_path):
    """'Tokens go only where they belong': engineTokenFile from one source never pairs with an
    engine another source chose (a trusted workspace's engine does not get the user's token file),
    and a workspace's TOML cannot set engineTokenFile at all, trusted or not."""
    files = workspace_files(tmp_path)
    secret = tmp_path / "git-credentials"
    files["user"].write_text(f'engineTokenFile = "{secret}"\ntrustedWorkspaces = ["{tmp_path / "ws"}"]\n')
    files["workspace"].write_text('engine = "http://127.0.0.1:9"\n')
    cfg = window.config
    cfg.reload_files(files)
    s = cfg.resolve()
    assert (s.engine, s.engine_token_file) == ("http://127.0.0.1:9", "")
    cfg.resolve()
    (message,) = window.shown_messages  # told once
    assert str(secret) in message and "http://127.0.0.1:9" in message

    files["workspace"].write_text(f'engine = "http://127.0.0.1:9"\nengineTokenFile = "{secret}"\n')
    files["user"].write_text(f'trustedWorkspaces = ["{tmp_path / "ws"}"]\n')
    cfg.reload_files(files)
    assert cfg.resolve().engine_token_file == ""
    assert "engineTokenFile" in window.shown_messages[-1] and "even in a trusted folder" in window.shown_messages[-1]

    # the user's own settings, the engine set beside the token file: it is used, also when another
    # layer repeats the same engine
    files["user"].write_text(f'engine = "http://127.0.0.1:9"\nengineTokenFile = "{secret}"\n')
    files["workspace"].write_text("")
    cfg.reload_files(files)
    cfg.set_layer("configuration", {"engine": "http://127.0.0.1:9"}, "workspace/configuration")
    assert cfg.resolve().engine_token_file == str(secret)
    cfg.set_layer("configuration", {"engine": "http://127.0.0.1:10"}, "workspace/configuration")
    assert cfg.resolve().engine_token_file == ""
