"""One window's settings sources: the layers, the TOML files behind two of them, their trust, and
watching them; no pygls. The LSP layer hands over what the editor sends (initializationOptions,
workspace/configuration, the workspace folder, the editor's trust) as plain values; every change
resolves the layers again and hands the :class:`Settings` to ``on_change`` (the session's).

Layers, lowest first: the user's TOML, the workspace's TOML, initializationOptions,
workspace/configuration, the command line. A bad key is reported (``warn``) and keeps its
previous value.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import msgspec

from . import settings as config
from .settings import Settings
from .errors import SettingsInvalid

log = logging.getLogger("diffu_lsp.configuration")

LAYERS = ("user", "workspace", "initializationOptions", "configuration", "cli")
SECTION = "diffu"  # the editor's settings section (workspace/configuration, initializationOptions)


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

    def __init__(self, warn: Callable[[str], None] = lambda message: None, *, cli: Mapping[str, Any] | None = None,
                 on_change: Callable[[Settings], None] = lambda settings: None):
        self.warn = warn
        self.on_change = on_change
        self.cli = {k: v for k, v in (cli or {}).items() if v is not None}  # the command line's layer
        self.root: Path | None = None  # the workspace folder (whose diffu-lsp.toml is a layer)
        self.stop_watching = asyncio.Event()
        self.layers: dict[str, dict[str, Any]] = {name: {} for name in LAYERS}
        self.file_state: dict[str, Any] = {}  # per file: what its layer was made from (content and trust)
        self.trusted_folders: list[Path] = []  # the user's TOML trustedWorkspaces
        # The editor's word (initializationOptions workspaceTrusted, then diffu/workspaceTrust): True
        # trusts the folder (VS Code's workspace trust), a SHA-256 only the workspace TOML with exactly
        # that content (Neovim's :trust), anything else nothing.
        self.workspace_trusted: bool | str = False
        self._reported: set[tuple[str, str]] = set()
        self._hub_reported: set[str] = set()

    def set_editor_trust(self, value: Any) -> None:
        """The editor's workspace trust: ``true``, or the SHA-256 (hex) of the content it trusts."""
        if isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{64}", value):
            self.workspace_trusted = value.lower()
        else:
            self.workspace_trusted = value is True

    def report_once(self, path: Path, why: str, message: str) -> None:
        if (str(path), why) not in self._reported:
            self._reported.add((str(path), why))
            self.warn(message)

    # ------------------------------------------------------------ the sources

    def start(self, options: Any) -> None:
        """The layers at start-up: the TOML files, the editor's initializationOptions (its "diffu"
        section when it has one; its ``workspaceTrusted`` is the editor's trust), the command line."""
        if isinstance(options, Mapping) and isinstance(options.get(SECTION), Mapping):
            options = options[SECTION]
        if isinstance(options, Mapping) and "workspaceTrusted" in options:
            options = dict(options)
            self.set_editor_trust(options.pop("workspaceTrusted"))
        self.reload(force=True)
        if options is not None:
            self.update("initializationOptions", options, "initializationOptions")
        self.update("cli", self.cli, "the command line")

    def update(self, name: str, raw: Any, source: str) -> None:
        """Replace one layer (a bad key is reported and keeps its previous value), and apply."""
        self.set_layer(name, raw, source)
        self.on_change(self.resolve())

    def pushed(self, settings: Any) -> None:
        """workspace/didChangeConfiguration's settings, from a client that is not asked for them."""
        if isinstance(settings, Mapping) and SECTION in settings:
            self.update("configuration", settings[SECTION], "workspace/didChangeConfiguration")

    def files(self) -> dict[str, Path]:
        files = {"user": config.user_config_file()}
        if self.root is not None:
            files["workspace"] = config.workspace_config_file(self.root)
        return files

    def reload(self, *, force: bool = False) -> None:
        """Read the TOML files again, and apply if a layer changed."""
        if self.reload_files(self.files(), force=force):
            self.on_change(self.resolve())

    async def watch(self) -> None:
        """Read the TOML files again when they change, until :meth:`stop`."""
        await watch(list(self.files().values()), self.reload, self.stop_watching)

    def stop(self) -> None:
        self.stop_watching.set()

    # ------------------------------------------------------------ layers

    def set_layer(self, name: str, raw: Any, source: str) -> None:
        """Replace one settings layer. A bad key is reported and keeps its previous value."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            self.warn_setting(SettingsInvalid("", f"Expected an object, got {raw!r}"), source)
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

    def warn_setting(self, error: SettingsInvalid, source: str) -> None:
        what = f"setting {error.key!r}" if error.key else "settings"
        self.warn(f"diffu-lsp: invalid {what} in {source}: {error.problem}. Keeping the previous value.")

    def resolve(self) -> Settings:
        """The settings of every layer, a hub model only from the local cache unless downloads are on,
        and a token file only for the engine its own layer chose."""
        layers = [self.layers[name] for name in LAYERS]
        settings, errors = config.resolve(layers)
        for error in errors:  # cannot happen: layers are validated on the way in
            log.warning("ignored setting: %s", error)
        if not config.token_paired(layers, settings):
            source = next((name for name in reversed(LAYERS) if self.layers[name].get("engineTokenFile") is not None),
                          "other")
            if settings.engine.startswith(("http://", "https://")):
                self.report_once(Path(settings.engine_token_file), settings.engine,
                                 f"diffu-lsp: not sending the token file {settings.engine_token_file} (set in the "
                                 f"{source} settings) to {settings.engine}: that engine was chosen elsewhere. A "
                                 "token file goes only to the engine set next to it, in the same settings.")
            settings = msgspec.structs.replace(settings, engine_token_file="")
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
        """Read the TOML ``files`` ({"user": ..., "workspace": ...}, the user's first); True if a
        layer changed. Each read decides the workspace file's trust again, from its current content
        and the current trust."""
        changed = False
        for name, path in files.items():
            try:
                data = config.read_settings_file(path)
                raw = config.decode_toml(data, path)
            except SettingsInvalid as error:
                self.warn(f"diffu-lsp: cannot use {path}: {error.problem}. Keeping the previous settings.")
                continue
            state = (raw, self.untrusted(name, path, data))
            if force or state != self.file_state.get(name):
                self.file_state[name] = state
                self.set_layer(name, self.trusted_part(name, path, raw, data), str(path))
                changed = True
        return changed

    def untrusted(self, name: str, path: Path, data: bytes) -> str | None:
        """Why the settings file ``path`` (its content ``data``) may not set the PROTECTED keys, or
        None when it may. The user's own TOML always may. A workspace's TOML may when it is a regular
        file inside the workspace (symlinks resolved) and the user trusts it: its folder is in
        trustedWorkspaces, or the editor trusts the folder, or the editor trusts exactly this content."""
        if name == "user":
            return None
        misplaced = config.misplaced(path)
        if misplaced:
            return misplaced
        folder = Path(path).parent
        if self.workspace_trusted is True or config.is_trusted(folder, self.trusted_folders):
            return None
        if isinstance(self.workspace_trusted, str):
            if hashlib.sha256(data).hexdigest() == self.workspace_trusted:
                return None
            return "it changed since you trusted it"
        return "this folder is not trusted"

    def trusted_part(self, name: str, path: Path, raw: dict, data: bytes | None = None) -> dict:
        """What a settings file may set. The user's TOML: everything (its ``trustedWorkspaces`` is
        kept apart). A workspace's TOML (``data`` its bytes, else read again): the PROTECTED keys
        only if :meth:`untrusted` finds no reason against, USER_ONLY keys never; what is dropped is
        reported once, until the file is trusted again. A relative ``model`` path resolves against
        the file's folder."""
        folder = Path(path).parent
        if name == "user":
            self.trusted_folders = config.trusted_folders(raw, folder)
            return config.model_relative_to(config.without_trust_key(raw), folder)
        if data is None:
            data = config.read_settings_file(path)
        why = self.untrusted(name, path, data)
        kept, dropped = config.split_protected(raw)
        if why is None:
            # a later change is told again
            self._reported = {r for r in self._reported if r[0] != str(path) or r[1] == "trusted"}
            never = (config.TRUST_KEY, *config.USER_ONLY)
            kept = {k: v for k, v in raw.items() if config.camel_case(str(k)) not in never}
            dropped = [k for k in dropped if k in never]
            if dropped:
                self.report_once(path, "trusted", f"diffu-lsp: ignoring {', '.join(dropped)} in {path}: only your "
                                 f"own {config.user_config_file()} may set them, even in a trusted folder.")
        elif dropped:
            self.report_once(path, why, f"diffu-lsp: ignoring {', '.join(dropped)} in {path}: {why}, so its settings "
                             "may not choose the model, device, engine or downloads. " + self.how_to_trust(path, why))
        return config.model_relative_to(kept, folder)

    @staticmethod
    def how_to_trust(path: Path, why: str) -> str:
        folder = Path(path).parent
        if why == "it changed since you trusted it":
            return ("They are ignored until you trust it again: review the file, then :trust it in Neovim "
                    f'(or add trustedWorkspaces = ["{folder}"] to your own {config.user_config_file()}).')
        if why == "this folder is not trusted":
            return (f'To trust it, add trustedWorkspaces = ["{folder}"] to your own {config.user_config_file()}, '
                    "or trust the workspace in your editor (VS Code: Workspaces: Manage Workspace Trust; "
                    "Neovim: :trust on the file).")
        return "Only a regular file inside the workspace can be trusted."


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
