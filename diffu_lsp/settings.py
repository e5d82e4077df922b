"""User settings: one typed struct, layered from TOML files and LSP messages.

Layers, lowest first: defaults, user TOML, workspace TOML, initializationOptions,
workspace/configuration (section ``diffu``). Keys are camelCase; snake_case is
accepted too. TOML files hold the keys at top level::

    threshold = 0.8
    single_line_tokens = 24
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.toml

from .errors import SettingsInvalid

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Probability = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Marker = Annotated[str, msgspec.Meta(min_length=1)]


class Settings(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True, frozen=True):
    """Everything a user can configure. Field names are snake_case, keys camelCase."""

    #: Diffusion code model: a local folder (Dream, DiffuCoder or LLaDA checkpoint) or a Hugging
    #: Face id, loaded from the local cache, or downloaded when it is not cached and `allowDownload`
    #: is on (`diffu-lsp pull ID` fetches one ahead). `null` uses the small model bundled with
    #: diffu-lsp.
    model: str | None = None
    #: Device the model runs on.
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    #: Weights dtype. `auto`: bfloat16 on a GPU and on a CPU with bfloat16 matrix hardware (Intel
    #: AMX), else float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Decoding: None defers to the model's own choice (its generation_config.json), else to the
    # sampler's defaults (threshold 0.9; factor 1). The bundled model ships the factor rule f=8,
    # chosen for it by `diffu-lsp bench quality` (BENCHMARKS.md, Quality).
    #: Denoising algorithm: which masked positions are revealed at each step. `null`: the model's
    #: own choice (its `generation_config.json`; the bundled model's is `factor` with factor 8),
    #: else `threshold`.
    algorithm: Literal["threshold", "factor", "entropy", "maskgit_plus", "topk_margin"] | None = None
    #: Denoising steps for the Dream-schedule algorithms. `null`: one step per masked token.
    steps: Positive | None = None
    #: Confidence a token needs to be revealed with the `threshold` algorithm (at least one token is
    #: revealed per step). `null`: the model's own, else 0.9.
    threshold: Probability | None = None
    #: With the `factor` algorithm: reveal the n most confident positions for the largest n whose
    #: n-th highest confidence is at least 1 - factor/(n+1) (at least one per step); larger reveals
    #: more per step. `null`: the model's own, else 1.
    factor: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    #: Sampling temperature; 0 is greedy (deterministic).
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    #: Nucleus sampling cut-off (used when temperature > 0). `null` disables it.
    top_p: Probability | None = None
    #: Top-k sampling cut-off (used when temperature > 0). `null` disables it.
    top_k: Positive | None = None
    #: Semi-autoregressive block length: masked tokens are generated block by block, left to right.
    #: `null`: a single block.
    block_length: Positive | None = None
    #: Subtracted from the EOS/pad logits before choosing tokens (fights holes that fill with pad).
    #: `null`: the model's own default from its `generation_config.json` (the bundled model ships
    #: 3.0), else 0.
    eos_penalty: Annotated[float, msgspec.Meta(ge=0.0)] | None = None
    #: A revealed end-of-text token ends its hole: the rest becomes padding and no more denoising
    #: steps are spent on it.
    early_exit: bool = True
    #: Token editing: each denoising step also re-reads the suggestion's visible tokens (a warm
    #: start's draft, tokens revealed earlier, a refined selection; never your text outside it) and
    #: replaces one when the model's top token there differs with at least this probability. Only
    #: for models trained to edit (LLaDA 2.1; a tiny-dream trained with `python -m diffu_lsp.train
    #: --edit-rate`); masked-only models (Dream, DiffuCoder, LLaDA 1, the bundled model) cannot judge
    #: visible tokens. `null`: the model's own (its `generation_config.json`), else off.
    edit_threshold: Probability | None = None
    #: Reuse the context's attention keys/values between denoising steps.
    kv_cache: Literal["none", "prefix", "dual", "delayed"] = "delayed"
    #: Also rebuild the key/value cache every N steps. `null`: once per block.
    cache_refresh_steps: Positive | None = None
    #: Run the model through `torch.compile` (for a GPU). The first suggestions of each new shape
    #: wait for compiling (over a minute on a CPU); if compiling fails the server logs why and runs
    #: the model as usual.
    compile: bool = False
    #: Start each job from the previous job's attention keys/values of the text both share at their
    #: start (a typing user's next request), instead of recomputing them: a cheaper first step for a
    #: typing user, at the cost of an approximation (those keys saw the previous document after
    #: them). BENCHMARKS.md (speed: across keystrokes) measures the latency saved and the edit
    #: similarity it costs.
    reuse_keys: bool = True
    #: Start a suggestion from the last one's tokens in the same document: what you typed is
    #: consumed where it agrees with them, the token it contradicts and a few after it are decoded
    #: again, and the rest is kept where the model still agrees (re-checked every step). Suggestions
    #: update in place instead of starting over. BENCHMARKS.md (typing replay) measures it against a
    #: cold start.
    warm_start: bool = False
    #: Maximum tokens of context taken before the cursor.
    prefix_tokens: Positive = 768
    #: Maximum tokens of context taken after the cursor.
    suffix_tokens: NonNegative = 256
    #: Hole size (masked tokens) for a single-line suggestion.
    single_line_tokens: Positive = 16
    #: Hole size (masked tokens) for a multi-line suggestion, at a block opener or in an empty body.
    multi_line_tokens: Positive = 48
    #: Hole size (masked tokens) for **Diffu: Complete Block**.
    block_tokens: Positive = 96
    #: Suggestions as you type (inline completion and the completion menu's diffu item). Off: they
    #: are answered empty; the commands still work. Neovim's `:DiffuToggle` and VS Code's
    #: **Diffu: Toggle Suggestions** set it.
    inline_completion: bool = True
    #: Language ids (as the editor names them, e.g. `markdown`, `plaintext`) whose documents get no
    #: suggestions as you type. Neovim's `:DiffuToggle filetype` adds or removes the current one.
    disabled_languages: tuple[Marker, ...] = ()
    #: Suggestions per request: the first as the settings decode it, the others sampled again (at
    #: temperature 0.8 unless `temperature` is higher, each with its own seed) from the same context,
    #: whose keys/values they reuse; duplicates and empty ones are dropped. Cycle through them with
    #: the editor's next/previous suggestion keys. Each costs about one more suggestion's model time
    #: (BENCHMARKS.md).
    candidates: Annotated[int, msgspec.Meta(ge=1, le=8)] = 1
    #: Delay after the last keystroke before an inline completion is computed, in milliseconds.
    debounce_ms: NonNegative = 60
    #: Tokens at the end of a suggestion revealed with a confidence below this are dropped (0 keeps
    #: everything).
    tail_confidence: Fraction = 0.0
    #: Markers that **Diffu: Fill Holes** replaces with generated code.
    hole_markers: tuple[Marker, ...] = ("...", "pass  # TODO", "# TODO: fill")
    #: What **Diffu: Refine Selection** regenerates.
    refine_mode: Literal["all", "low_confidence"] = "all"
    #: With `low_confidence` refinement, tokens the model scores below this are regenerated.
    refine_confidence: Fraction = 0.6
    #: Next-edit predictions: after an edit settles, the places it implies a change at (the other
    #: uses of a renamed name, the sibling lines of a changed call) are denoised together, and each
    #: change the model is sure of is shown as a hint with a quick fix (`hint`). Neovim's
    #: `:DiffuNextEdit` and VS Code's **Diffu: Next Edit** jump to the next one. `off`: none.
    next_edit: Literal["off", "hint"] = "hint"
    #: Pause after the last keystroke before next edits are predicted, in milliseconds.
    next_edit_delay_ms: NonNegative = 500
    #: Confidence the least sure token of a predicted next edit needs for it to be shown.
    next_edit_confidence: Fraction = 0.5
    #: Documents larger than this (in bytes) still get completions and commands, from the whole
    #: lines around the cursor (or the command's range) that `prefixTokens`/`suffixTokens` can use:
    #: the rest of the document is not scanned or encoded.
    max_document_bytes: Positive = 4_000_000
    #: Level of the server's log on stderr, which editors keep as its log (VS Code's **Diffu LSP**
    #: output channel; Neovim's `lsp.log`, where every stderr line is an `[ERROR]`). What you should
    #: see (the model loaded, settings changed) is sent as a log message to the editor whatever this is.
    log_level: Literal["error", "warning", "info", "debug"] = "warning"

    #: The shared model daemon exits this many seconds after its last editor window disconnects
    #: (`0`: it stays until `diffu-lsp daemon stop`). Read when the daemon starts.
    daemon_idle_seconds: NonNegative = 900
    #: Memory budget of the shared model daemon: past it, loading another model unloads the least
    #: recently used one (`0`: no budget). Read when the daemon starts.
    daemon_memory_mb: NonNegative = 0
    #: A job that hears nothing from the model daemon (no answer, no reply to a ping) for this many
    #: seconds is answered empty and the status shows `stuck`; the next request reconnects, and
    #: replaces a daemon that still does not answer. A daemon whose process does not run at all
    #: (stopped or frozen) is found sooner: after 2 s without a reply to its pings, whatever this
    #: says.
    daemon_deadline_seconds: Annotated[float, msgspec.Meta(ge=1.0)] = 10.0
    #: Who runs the model: `daemon` (this machine's shared model daemon), `local` (this window, like
    #: `--no-daemon`), or the URL of a team cluster started with `diffu-lsp cluster start` (e.g.
    #: `http://127.0.0.1:8270`). When the cluster cannot be reached the server falls back to the
    #: local daemon and says so once.
    engine: Annotated[str, msgspec.Meta(pattern=r"^(daemon|local|https?://\S+)$")] = "daemon"
    #: File holding the cluster's token (for `engine` set to a URL). Empty: the token file
    #: `diffu-lsp cluster start` wrote on this machine (`~/.config/diffu-lsp/cluster-token`). Remote
    #: users copy that file (keep it mode 600) and point this at it.
    engine_token_file: str = ""
    #: Fetch a Hugging Face model that is not in the local cache. Off: a hub id must already be
    #: cached (`diffu-lsp pull ID` is the explicit way) and nothing is downloaded. Honoured only
    #: from trusted settings.
    allow_download: bool = False


# camelCase key -> field name, e.g. "topP" -> "top_p"
_FIELDS: dict[str, str] = {f.encode_name: f.name for f in msgspec.structs.fields(Settings)}
_HINTS = typing.get_type_hints(Settings, include_extras=True)


def camel_case(key: str) -> str:
    """``top_p`` -> ``topP``; camelCase keys come back unchanged."""
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _problem(key: str, value: Any, error: msgspec.ValidationError) -> str:
    hint = _HINTS[_FIELDS[key]]
    if typing.get_origin(hint) is Literal:
        return f"Expected one of {', '.join(map(repr, typing.get_args(hint)))}, got {value!r}"
    expected = str(error).split(" - at `", 1)[0].split(", got ", 1)[0].replace("`", "")
    return f"{expected}, got {value!r}"


def _set(current: dict[str, Any], raw_key: str, value: Any) -> Settings:
    """Validate ``current`` with one key replaced; raise SettingsInvalid naming that key."""
    key = camel_case(raw_key)
    if key not in _FIELDS:
        hint = difflib.get_close_matches(key, _FIELDS, n=1)
        raise SettingsInvalid(raw_key, "Unknown setting" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    try:
        return msgspec.convert({**current, key: value}, Settings)
    except msgspec.ValidationError as e:
        raise SettingsInvalid(key, _problem(key, value, e)) from None


def _overlay(base: Settings, overrides: Mapping | None, errors: list[SettingsInvalid] | None) -> Settings:
    current = msgspec.to_builtins(base)
    settings = base
    for raw_key, value in (overrides or {}).items():
        try:
            settings = _set(current, str(raw_key), value)
        except SettingsInvalid as e:
            if errors is None:
                raise
            errors.append(e)
            continue
        current = msgspec.to_builtins(settings)
    return settings


def apply(base: Settings, overrides: Mapping | None) -> Settings:
    """Return ``base`` with ``overrides`` laid over it; the first bad key raises SettingsInvalid."""
    if overrides is not None and not isinstance(overrides, Mapping):
        raise SettingsInvalid("", f"Expected an object, got {overrides!r}")
    return _overlay(base, overrides, None)


def resolve(layers: Sequence[Mapping | None]) -> tuple[Settings, list[SettingsInvalid]]:
    """Defaults, then each layer in order. A bad key is reported and skipped; its previous value stays."""
    settings = Settings()
    errors: list[SettingsInvalid] = []
    for layer in layers:
        if layer is not None and not isinstance(layer, Mapping):
            errors.append(SettingsInvalid("", f"Expected an object, got {layer!r}"))
            continue
        settings = _overlay(settings, layer, errors)
    return settings, errors


def user_config_file() -> Path:
    """``$XDG_CONFIG_HOME/diffu-lsp/diffu-lsp.toml`` (``~/.config`` when unset)."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "diffu-lsp" / "diffu-lsp.toml"


def workspace_config_file(root: Path) -> Path:
    return Path(root) / "diffu-lsp.toml"


# A settings file larger than this is refused before it is read (they are a few lines).
MAX_SETTINGS_BYTES = 1 << 20


def read_settings_file(path: Path) -> bytes:
    """The bytes of a settings file (following symlinks); b"" when missing. Anything that is not a
    regular file (a FIFO would block the read forever), or is larger than MAX_SETTINGS_BYTES, or is
    unreadable -> SettingsInvalid(key=path)."""
    try:  # non-blocking: opening a FIFO for reading would wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return b""
    except OSError as e:
        raise SettingsInvalid(str(path), f"Cannot read file: {e.strerror or e}", section="") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SettingsInvalid(str(path), "Not a regular file", section="")
        if st.st_size > MAX_SETTINGS_BYTES:
            raise SettingsInvalid(str(path), f"File too large ({st.st_size} bytes; at most {MAX_SETTINGS_BYTES})",
                                  section="")
        try:
            data = f.read(MAX_SETTINGS_BYTES + 1)
        except OSError as e:
            raise SettingsInvalid(str(path), f"Cannot read file: {e.strerror or e}", section="") from None
    if len(data) > MAX_SETTINGS_BYTES:
        raise SettingsInvalid(str(path), f"File too large (over {MAX_SETTINGS_BYTES} bytes)", section="")
    return data


def decode_toml(data: bytes, path: Path) -> dict:
    try:
        return msgspec.toml.decode(data)
    except msgspec.DecodeError as e:
        raise SettingsInvalid(str(path), f"Invalid TOML: {e}", section="") from None


def read_toml(path: Path) -> dict:
    """The TOML file as a dict; {} when missing. Not a regular file, too large, unreadable or
    invalid -> SettingsInvalid(key=path)."""
    return decode_toml(read_settings_file(path), path)


# A workspace's own settings (its diffu-lsp.toml) may set these only when the user trusts that folder:
# they choose what is loaded, on which device, whether it is downloaded and who is sent the documents.
PROTECTED = ("model", "device", "engine", "engineTokenFile", "allowDownload")
# The user's own TOML only: folders (and their subfolders) whose diffu-lsp.toml may set PROTECTED keys.
TRUST_KEY = "trustedWorkspaces"
# Never from a workspace's TOML, trusted or not: the token file's content is sent to the engine, so it
# comes only from your own settings, next to the engine it is for (see token_paired).
USER_ONLY = ("engineTokenFile",)


def trusted_folders(user_raw: Mapping, base: Path) -> list[Path]:
    """The user TOML's ``trustedWorkspaces`` as absolute paths (relative ones against ``base``)."""
    value = user_raw.get(TRUST_KEY, user_raw.get("trusted_workspaces", []))
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence):
        return []
    return [(base / Path(v).expanduser()).resolve() for v in value if isinstance(v, str) and v]


def is_trusted(folder: Path, trusted: Sequence[Path]) -> bool:
    folder = Path(folder).resolve()
    return any(folder == t or t in folder.parents for t in trusted)


def misplaced(path: Path) -> str | None:
    """Why a workspace's TOML ``path`` can never be trusted, or None: with symlinks resolved it must
    be a regular file inside the workspace folder (``path``'s folder). A link to a file elsewhere
    would carry the trust of that file's content, or of another folder."""
    path = Path(path)
    try:
        real, folder = path.resolve(strict=True), path.parent.resolve(strict=True)
        regular = stat.S_ISREG(real.stat().st_mode)
    except (OSError, RuntimeError):  # missing, a symlink loop
        return "it cannot be read"
    if folder not in real.parents:
        return f"it is a link to {real}, outside the workspace"
    if not regular:
        return "it is not a regular file"
    return None


def token_paired(layers: Sequence[Mapping], settings: Settings) -> bool:
    """Whether ``settings.engine_token_file`` may be sent to ``settings.engine``: the layer that set
    that token file (the last one to set it) also set that engine. A token file from one source never
    goes to an engine another source chose."""
    if not settings.engine_token_file:
        return True
    for layer in reversed(layers):
        if layer.get("engineTokenFile") is not None:
            return layer.get("engine") == settings.engine
    return False


def split_protected(raw: Mapping) -> tuple[dict, list[str]]:
    """(raw without the PROTECTED keys and trustedWorkspaces, the camelCase keys taken out)."""
    kept, dropped = {}, []
    for key, value in raw.items():
        name = camel_case(str(key))
        if name in PROTECTED or name == TRUST_KEY:
            dropped.append(name)
        else:
            kept[key] = value
    return kept, dropped


def without_trust_key(raw: Mapping) -> dict:
    return {k: v for k, v in raw.items() if camel_case(str(k)) != TRUST_KEY}


def model_relative_to(raw: Mapping, folder: Path) -> dict:
    """``raw`` with a ``model`` path like ``./m``, ``../m`` or an existing subfolder resolved against
    ``folder`` (the folder of the file that set it); hub ids and absolute paths stay as they are."""
    out = dict(raw)
    value = out.get("model")
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
        return out
    if value.startswith(("./", "../", ".\\", "..\\")) or value in (".", "..") or (folder / value).is_dir():
        out["model"] = str((folder / value).resolve())
    return out


def is_hub_id(model: str | None) -> bool:
    """``org/name`` (or ``name``) that is not a local path."""
    if not model or model.startswith((".", "/", "~", "\\")) or Path(model).expanduser().exists():
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model) is not None


def sampling_options(s: Settings) -> dict[str, Any]:
    """Keyword arguments for the sampler."""
    return {
        "alg": s.algorithm,
        "steps": s.steps,
        "threshold": s.threshold,
        "factor": s.factor,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "block_length": s.block_length,
        "early_exit": s.early_exit,
        "eos_penalty": s.eos_penalty,
        "edit_threshold": s.edit_threshold,
    }
