"""Workspace trust (issue #17): a cloned repository's diffu-lsp.toml may not choose the model,
device, engine or downloads unless the user trusts that folder; a hub id is never fetched unless
downloads are allowed. End-to-end through a real server process, plus the rules in-process."""

from __future__ import annotations

import json
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
    assert window.config.trusted_part("workspace", toml, raw) == {"threshold": 0.5}
    assert window.config.trusted_part("workspace", toml, raw) == {"threshold": 0.5}
    (message,) = window.shown_messages  # once per file
    for key in ("model", "device", "engine", "engineTokenFile", "trustedWorkspaces"):
        assert key in message

    window.config.trusted_part("user", tmp_path / "xdg" / "diffu-lsp.toml", {"trustedWorkspaces": [str(tmp_path)]})
    kept = window.config.trusted_part("workspace", toml, raw)
    assert "trustedWorkspaces" not in kept and kept["device"] == "cuda"
    expected = str((tmp_path / "ws" / "evil-model").resolve()) if model.startswith("./") else model
    assert kept["model"] == expected


def test_editor_workspace_trust_is_honoured(window, tmp_path):
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
