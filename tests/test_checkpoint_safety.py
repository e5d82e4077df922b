"""What a checkpoint cannot do to the machine that loads it (#24, findings 4 and 7): pickled
weights are not loaded unless whoever starts diffu-lsp allows them (a pickle can run code), and a
config.json is checked against sane bounds and the safetensors headers before anything is built,
outside the daemon's load lock."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffu_lsp.models import loading
from diffu_lsp.models.loading import ALLOW_PICKLED_WEIGHTS, BUNDLED_MODEL, load_model
from diffu_lsp.errors import ModelLoadFailed

SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def bundled_copy(folder: Path, *, weights: bool = True, **config) -> Path:
    folder.mkdir()
    for name in SMALL_FILES:
        shutil.copy(BUNDLED_MODEL / name, folder / name)
    if weights:
        shutil.copy(BUNDLED_MODEL / "model.safetensors", folder / "model.safetensors")
    if config:
        data = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**data, **config}))
    return folder


class RunsCode:
    """Unpickling this creates the marker file: proof that the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ALLOW_PICKLED_WEIGHTS, raising=False)


def test_pickled_weights_are_refused_unless_allowed(tmp_path, no_env, monkeypatch):
    folder = bundled_copy(tmp_path / "pickled", weights=False)
    torch.save(load_file(str(BUNDLED_MODEL / "model.safetensors")), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadFailed, match=r"pickled \(pytorch_model.bin\).*--allow-pickled-weights"):
        load_model(folder, device="cpu")
    monkeypatch.setenv(ALLOW_PICKLED_WEIGHTS, "1")  # whoever starts diffu-lsp may allow them
    assert load_model(folder, device="cpu").family == "dream"


def test_a_pickle_that_would_run_code_runs_nothing(tmp_path, no_env, monkeypatch):
    folder = bundled_copy(tmp_path / "evil", weights=False)
    marker = tmp_path / "ran"
    torch.save({"model.embed_tokens.weight": RunsCode(marker)}, folder / "pytorch_model.bin")
    real_load = torch.load
    seen = []

    def unsafe_load(*args, **kwargs):  # a torch whose default is not weights_only=True
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **{**kwargs, "weights_only": False})

    monkeypatch.setattr(torch, "load", unsafe_load)
    with pytest.raises(ModelLoadFailed, match="pickled"):
        load_model(folder, device="cpu")
    assert not marker.exists() and seen == []  # refused before anything opened the pickle

    # Allowed, it goes through torch's restricted unpickler: weights_only pinned, not left to a default.
    def recording_load(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    monkeypatch.setenv(ALLOW_PICKLED_WEIGHTS, "1")
    with pytest.raises(ModelLoadFailed):
        load_model(folder, device="cpu")
    assert not marker.exists() and seen and all(flag is True for flag in seen), seen


@pytest.fixture
def nothing_built(monkeypatch):
    """Records every attempt to build a network (there must be none for a refused config)."""
    built = []

    def from_pretrained(*args, **kwargs):
        built.append(args)
        raise RuntimeError("built a network from a config that should have been refused")

    monkeypatch.setattr(loading.Qwen2ForCausalLM, "from_pretrained", from_pretrained)
    return built


@pytest.mark.parametrize("config, problem", [
    ({"num_hidden_layers": 200_000}, "num_hidden_layers is 200000; expected a whole number from 1 to 1,024"),
    ({"num_hidden_layers": 7}, "num_hidden_layers is 7 but its weights have 6 layers"),
    ({"hidden_size": 10**6}, "hidden_size is 1000000; expected a whole number from 1 to 65,536"),
    ({"vocab_size": 1_000_000}, "config.json describes about"),
    ({"intermediate_size": 300_000}, "config.json describes about"),
    ({"num_attention_heads": "4"}, "does not describe a dream network: .*num_attention_heads"),
])
def test_config_sizes_are_checked_before_anything_is_built(tmp_path, nothing_built, config, problem):
    folder = bundled_copy(tmp_path / "big", **config)
    with pytest.raises(ModelLoadFailed, match=problem):
        load_model(folder, device="cpu")
    assert nothing_built == []


def test_a_file_that_is_not_safetensors_is_refused_at_its_header(tmp_path, nothing_built):
    folder = bundled_copy(tmp_path / "broken")
    (folder / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ModelLoadFailed, match="model.safetensors is not a safetensors file"):
        load_model(folder, device="cpu")
    assert nothing_built == []


def test_the_daemon_checks_a_checkpoint_outside_its_load_lock(tmp_path, nothing_built):
    """A bad config fails at once while another load holds the daemon's load lock (before: it
    waited for the lock, then built 200,000 layers under it for 90 s)."""
    from diffu_lsp.daemon import Paths
    from diffu_lsp.daemon.host import Daemon
    from diffu_lsp.job import ModelKey

    folder = bundled_copy(tmp_path / "big", num_hidden_layers=200_000)
    daemon = Daemon(Paths(tmp_path / "run"), idle_seconds=0)
    outcome = {}

    def load() -> None:
        try:
            daemon._load(ModelKey(str(folder), "cpu", "float32"))
        except Exception as error:  # noqa: BLE001
            outcome["error"] = error

    assert daemon._load_lock.acquire(timeout=5)  # another model is loading
    try:
        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        thread.join(20)
        assert not thread.is_alive(), "the check waited for the load lock"
    finally:
        daemon._load_lock.release()
    thread.join(20)
    assert isinstance(outcome.get("error"), ModelLoadFailed) and "num_hidden_layers" in str(outcome["error"])
    assert nothing_built == []
