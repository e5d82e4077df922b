"""One window's settings layers, the TOML files behind two of them, their trust, and watching
them: no pygls. The LSP layer feeds the layers from the editor (initializationOptions,
workspace/configuration) and the command line, and takes the resolved :class:`Settings`.

Layers, lowest first: the user's TOML, the workspace's TOML, initializationOptions,
workspace/configuration, the command line. A bad key is reported (``warn``) and keeps its
previous value.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import msgspec

from . import settings as config
from .settings import Settings, SettingsError

log = logging.getLogger("diffu_lsp.configuration")

LAYERS = ("user", "workspace", "initializationOptions", "configuration", "cli")


def cached_snapshot(hub_id: str) -> str | None:
    """The local snapshot folder of a hub model, or None when it is not cached (never fetches)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return snapshot_download(hub_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, bad id, unreadable cache
        return None


class Configuration:
    """``warn(message)`` tells the user about a bad setting or file, an untrusted folder's
    protected keys, or a hub model that will not be downloaded."""

    def __init__(self, warn: Callable[[str], None] = lambda message: None):
        self.warn = warn
        self.layers: dict[str, dict[str, Any]] = {name: {} for name in LAYERS}
        self.file_raw: dict[str, Any] = {}
        self.trusted_folders: list[Path] = []  # the user's TOML trustedWorkspaces
        self.workspace_trusted: bool | None = None  # the editor's word (initializationOptions workspaceTrusted)
        self._untrusted_reported: set[str] = set()
        self._hub_reported: set[str] = set()

    # ------------------------------------------------------------ layers

    def set_layer(self, name: str, raw: Any, source: str) -> None:
        """Replace one settings layer. A bad key is reported and keeps its previous value."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            self.warn_setting(SettingsError("", f"Expected an object, got {raw!r}"), source)
            return
        _, errors = config.resolve([raw])
        bad = {config.camel_case(e.key) for e in errors}
        previous = self.layers[name]
        layer: dict[str, Any] = {}
        for key, value in raw.items():
            key = config.camel_case(str(key))
            if key not in bad:
                layer[key] = value
            elif key in previous:
                layer[key] = previous[key]
        self.layers[name] = layer
        for error in errors:
            self.warn_setting(error, source)

    def warn_setting(self, error: SettingsError, source: str) -> None:
        what = f"setting {error.key!r}" if error.key else "settings"
        self.warn(f"diffu-lsp: invalid {what} in {source}: {error.problem}. Keeping the previous value.")

    def resolve(self) -> Settings:
        """The settings of every layer, a hub model only from the local cache unless downloads are on."""
        settings, errors = config.resolve([self.layers[name] for name in LAYERS])
        for error in errors:  # cannot happen: layers are validated on the way in
            log.warning("ignored setting: %s", error)
        return self.without_download(settings)

    def without_download(self, settings: Settings) -> Settings:
        """A hub id is loaded from the local cache (its snapshot folder) unless allowDownload is on;
        one that is not cached is told once, and the bundled model is used meanwhile."""
        if settings.allow_download or not config.is_hub_id(settings.model):
            return settings
        folder = cached_snapshot(settings.model)
        if folder is None:
            if settings.model not in self._hub_reported:
                self._hub_reported.add(settings.model)
                self.warn(f"diffu-lsp: the model {settings.model!r} is not in the local Hugging Face cache and "
                          f"downloads are off: run `diffu-lsp pull {settings.model}`, or set allowDownload = true "
                          "in your own settings. Using the bundled model meanwhile.")
            return msgspec.structs.replace(settings, model=None)
        return msgspec.structs.replace(settings, model=folder)

    # ------------------------------------------------------------ files

    def reload_files(self, files: dict[str, Path], *, force: bool = False) -> bool:
        """Read the TOML ``files`` ({"user": ..., "workspace": ...}); True if a layer changed."""
        changed = False
        for name, path in files.items():
            try:
                raw = config.read_toml(path)
            except SettingsError as error:
                self.warn(f"diffu-lsp: cannot use {path}: {error.problem}. Keeping the previous settings.")
                continue
            if force or raw != self.file_raw.get(name):
                self.file_raw[name] = raw
                trusted = self.trusted_folders
                self.set_layer(name, self.trusted_part(name, path, raw), str(path))
                changed = True
                force = force or self.trusted_folders != trusted  # re-read the workspace's file under the new trust
        return changed

    def trusted_part(self, name: str, path: Path, raw: dict) -> dict:
        """What a settings file may set. The user's TOML: everything (its ``trustedWorkspaces`` is
        kept apart). A workspace's TOML: the PROTECTED keys only if the user trusts that folder
        (``trustedWorkspaces`` in the user's TOML, or the editor's own workspace trust); else they
        are dropped and reported once. A relative ``model`` path resolves against the file's folder."""
        folder = Path(path).parent
        if name == "user":
            self.trusted_folders = config.trusted_folders(raw, folder)
            return config.model_relative_to(config.without_trust_key(raw), folder)
        kept, dropped = config.split_protected(raw)
        if self.workspace_trusted is True or config.is_trusted(folder, self.trusted_folders):
            kept, dropped = config.without_trust_key(raw), [k for k in dropped if k == config.TRUST_KEY]
        if dropped and str(path) not in self._untrusted_reported:
            self._untrusted_reported.add(str(path))
            self.warn(f"diffu-lsp: ignoring {', '.join(dropped)} in {path}: this folder is not trusted, so its "
                      "settings may not choose the model, device, engine or downloads. To trust it, add "
                      f'trustedWorkspaces = ["{folder}"] to your own {config.user_config_file()}, or trust '
                      "the workspace in your editor (VS Code: Workspaces: Manage Workspace Trust; "
                      "Neovim: :trust on the file)")
        return config.model_relative_to(kept, folder)


async def watch(files: list[Path], on_change: Callable[[], None], stop: asyncio.Event) -> None:
    """Call ``on_change`` when one of ``files`` changes (watchfiles on their parent folders), until
    ``stop`` is set."""
    try:
        from watchfiles import awatch
    except ImportError:
        log.warning("watchfiles is not installed; settings files are read at start-up only")
        return

    def folder(path: Path) -> Path:
        while not path.exists() and path.parent != path:
            path = path.parent
        return path

    def wanted(_change, changed: str) -> bool:
        p = Path(changed)
        return any(p == f or p in f.parents for f in files)

    while not stop.is_set():
        folders = {folder(f.parent) for f in files}
        try:
            async for _changes in awatch(*folders, watch_filter=wanted, debounce=400, step=50,
                                         recursive=False, stop_event=stop):
                on_change()
                if {folder(f.parent) for f in files} != folders:
                    break  # a settings folder appeared or vanished: watch the new set
            on_change()  # whatever happened while we switched watchers
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001
            log.warning("watching settings files failed (%r); retrying in 2 s", error)
            await asyncio.sleep(2)
