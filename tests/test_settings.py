from pathlib import Path

import pytest

from diffu_lsp.errors import SettingsInvalid
from diffu_lsp.settings import (
    Settings,
    apply,
    camel_case,
    read_toml,
    resolve,
    sampling_options,
    user_config_file,
    workspace_config_file,
)


def test_defaults():
    s = Settings()
    # decoding left to the model (its generation_config.json), see tests/test_models.py
    assert (s.model, s.device, s.dtype, s.algorithm, s.threshold, s.factor) == (None, "auto", "auto", None, None, None)
    assert (s.steps, s.temperature, s.top_p, s.top_k, s.block_length) == (None, 0.0, None, None, None)
    assert (s.prefix_tokens, s.suffix_tokens) == (768, 256)
    assert (s.single_line_tokens, s.multi_line_tokens, s.block_tokens) == (16, 48, 96)
    assert (s.debounce_ms, s.tail_confidence) == (60, 0.0)
    assert s.hole_markers == ("...", "pass  # TODO", "# TODO: fill")
    assert (s.refine_mode, s.refine_confidence) == ("all", 0.6)
    assert (s.max_document_bytes, s.log_level) == (4_000_000, "warning")


def test_apply_overlays_camel_case_and_keeps_base():
    base = Settings()
    s = apply(base, {"threshold": 0.75, "topK": 5, "holeMarkers": ["<FILL>"], "model": "/models/dream"})
    assert (s.threshold, s.top_k, s.hole_markers, s.model) == (0.75, 5, ("<FILL>",), "/models/dream")
    assert s.prefix_tokens == 768
    assert base == Settings()
    assert apply(base, None) == base
    assert apply(base, {}) == base


def test_apply_accepts_snake_case():
    s = apply(Settings(), {"top_p": 0.95, "single_line_tokens": 24, "blockLength": 8})
    assert (s.top_p, s.single_line_tokens, s.block_length) == (0.95, 24, 8)


def test_apply_can_reset_to_none():
    s = apply(Settings(steps=32, model="x"), {"steps": None, "model": None})
    assert (s.steps, s.model) == (None, None)


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        ({"threshold": 7}, "threshold", "diffu.threshold: Expected float <= 1.0, got 7"),
        ({"threshold": 0}, "threshold", "diffu.threshold: Expected float > 0.0, got 0"),
        ({"temperature": -1}, "temperature", "diffu.temperature: Expected float >= 0.0, got -1"),
        ({"top_p": 1.5}, "topP", "diffu.topP: Expected float <= 1.0, got 1.5"),
        ({"topK": 0}, "topK", "diffu.topK: Expected int >= 1, got 0"),
        ({"steps": "many"}, "steps", "diffu.steps: Expected int | null, got 'many'"),
        ({"prefixTokens": 1.5}, "prefixTokens", "diffu.prefixTokens: Expected int, got 1.5"),
        ({"device": "tpu"}, "device", "diffu.device: Expected one of 'auto', 'cpu', 'cuda', 'mps', got 'tpu'"),
        ({"holeMarkers": [""]}, "holeMarkers", "diffu.holeMarkers: Expected str of length >= 1, got ['']"),
        ({"tresholdd": 0.5}, "tresholdd", "diffu.tresholdd: Unknown setting; did you mean 'threshold'?"),
        ({"colour": "red"}, "colour", "diffu.colour: Unknown setting"),
    ],
)
def test_apply_rejects_and_names_key(overrides, key, message):
    with pytest.raises(SettingsInvalid) as caught:
        apply(Settings(), overrides)
    assert caught.value.key == key
    assert str(caught.value) == message
    assert caught.value.problem == message.split(": ", 1)[1]


def test_apply_rejects_non_mapping():
    with pytest.raises(SettingsInvalid):
        apply(Settings(), ["threshold", 0.5])


def test_resolve_layers_in_order():
    user = {"threshold": 0.5, "prefix_tokens": 512}
    workspace = {"threshold": 0.6}
    init_options = {"topK": 3}
    configuration = {"threshold": 0.7, "topK": 4}
    s, errors = resolve([user, workspace, None, init_options, configuration])
    assert errors == []
    assert (s.threshold, s.prefix_tokens, s.top_k) == (0.7, 512, 4)


def test_resolve_skips_bad_keys_and_keeps_previous_values():
    s, errors = resolve(
        [
            {"threshold": 0.5, "steps": 16},
            {"threshold": 7, "steps": 24, "bogus": 1, "temperature": 0.2},
        ]
    )
    assert (s.threshold, s.steps, s.temperature) == (0.5, 24, 0.2)
    assert [(e.key, type(e)) for e in errors] == [("threshold", SettingsInvalid), ("bogus", SettingsInvalid)]


def test_resolve_reports_non_mapping_layer():
    s, errors = resolve([{"steps": 8}, "not an object", {"topK": 2}])
    assert (s.steps, s.top_k) == (8, 2)
    assert len(errors) == 1


def test_config_file_locations(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert user_config_file() == tmp_path / "diffu-lsp" / "diffu-lsp.toml"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert user_config_file() == Path.home() / ".config" / "diffu-lsp" / "diffu-lsp.toml"
    assert workspace_config_file(tmp_path) == tmp_path / "diffu-lsp.toml"


def test_read_toml(tmp_path):
    path = tmp_path / "diffu-lsp.toml"
    assert read_toml(path) == {}
    path.write_text('model = "/models/dream"\nsingle_line_tokens = 24\nhole_markers = ["...", "<FILL>"]\n')
    data = read_toml(path)
    assert data == {"model": "/models/dream", "single_line_tokens": 24, "hole_markers": ["...", "<FILL>"]}
    s, errors = resolve([data])
    assert errors == []
    assert (s.model, s.single_line_tokens, s.hole_markers) == ("/models/dream", 24, ("...", "<FILL>"))


def test_read_toml_parse_error_names_file(tmp_path):
    path = tmp_path / "diffu-lsp.toml"
    path.write_text("threshold = \n")
    with pytest.raises(SettingsInvalid) as caught:
        read_toml(path)
    assert caught.value.key == str(path)
    assert str(caught.value).startswith(f"{path}: Invalid TOML")


def test_camel_case():
    assert camel_case("top_p") == "topP"
    assert camel_case("max_document_bytes") == "maxDocumentBytes"
    assert camel_case("maxDocumentBytes") == "maxDocumentBytes"
    assert camel_case("model") == "model"


def test_sampling_options():
    s = Settings(algorithm="entropy", steps=32, threshold=0.8, factor=2.5, temperature=0.2, top_p=0.9, top_k=40,
                 block_length=8, early_exit=False)
    assert sampling_options(s) == {
        "alg": "entropy",
        "steps": 32,
        "threshold": 0.8,
        "factor": 2.5,
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "block_length": 8,
        "early_exit": False,
        "edit_threshold": None,
        "eos_penalty": None,
    }


def _check_settings_module():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "editors" / "vscode" / "scripts" / "check_settings.py"
    spec = importlib.util.spec_from_file_location("check_settings", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_package_json_descriptions_are_the_settings_py_comments(monkeypatch, capsys):
    """editors/vscode/package.json matches Settings (keys, defaults, enums) and each description is
    the `#:` comment above the field (issue #15); a changed comment is reported as drift."""
    check = _check_settings_module()
    assert check.main([]) == 0, capsys.readouterr().out
    described = check.field_descriptions()
    import json

    import diffu_lsp

    bundled = json.loads((Path(diffu_lsp.__file__).parent / "assets" / "tiny-dream" / "generation_config.json").read_text())
    assert f"`{bundled['alg']}` with factor {bundled['factor']:g}" in described["algorithm"]
    edited = dict(described, max_document_bytes="Documents larger than this get no completions.")
    monkeypatch.setattr(check, "field_descriptions", lambda: edited)
    assert check.main([]) == 1
    assert "diffu.maxDocumentBytes: description differs" in capsys.readouterr().out


def test_vscode_readme_shows_the_defaults(monkeypatch, capsys):
    """editors/vscode/README.md's settings example shows the real defaults (it once showed
    `"diffu.threshold": 0.9`, whose default is null); the check reads and compares them."""
    check = _check_settings_module()
    shown = check.readme_defaults()
    assert {"model", "algorithm", "threshold", "debounceMs", "holeMarkers"} <= set(shown)
    monkeypatch.setattr(check, "readme_defaults", lambda: dict(shown, threshold=0.9))
    assert check.main([]) == 1
    assert "README.md: diffu.threshold shown as 0.9, the default is None" in capsys.readouterr().out
