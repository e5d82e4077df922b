"""The import rules of README's "Architecture" section, checked by parsing each module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "diffu_lsp"

# Below the LSP layer: none of these may import pygls or lsprotocol.
BELOW_LSP = ["session.py", "configuration.py", "engine.py", "job.py", "errors.py", "jobs.py", "features.py", "infill.py", "postprocess.py",
             "draft.py", "nextedit.py",
             "sampler.py", "settings.py", "daemon", "cluster/client.py", "cluster/__init__.py", "models"]
# Tools beside the server (training, benchmarks) may build models with transformers themselves.
# cli.py imports it only to print its version (could be importlib.metadata.version: cli.py is not this test's).
TRANSFORMERS_ALLOWED = ["models", "train.py", "bench", "cli.py"]


def modules(names: list[str]) -> list[Path]:
    out = []
    for name in names:
        path = PACKAGE / name
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def imported(path: Path) -> set[str]:
    """Top-level names of every absolute import in the module, wherever it stands (lazy ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def relative_imports(path: Path) -> set[str]:
    return {node.module or "" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.level}


def test_nothing_below_the_lsp_layer_imports_pygls():
    offenders = {str(p.relative_to(PACKAGE)): sorted(imported(p) & {"pygls", "lsprotocol"})
                 for p in modules(BELOW_LSP)}
    assert not {k: v for k, v in offenders.items() if v}


def test_only_the_model_backend_imports_transformers():
    allowed = set(modules(TRANSFORMERS_ALLOWED))
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "assets" not in p.parts and p not in allowed and "transformers" in imported(p)]
    assert not offenders


def test_leaf_modules_import_nothing_from_the_package():
    assert relative_imports(PACKAGE / "errors.py") == set()
    assert relative_imports(PACKAGE / "settings.py") == set()
    assert relative_imports(PACKAGE / "job.py") == set()
    assert relative_imports(PACKAGE / "draft.py") == set()
    assert not imported(PACKAGE / "draft.py") & {"torch", "transformers"}  # light: the engines import it


def test_the_session_and_engines_do_not_import_the_server():
    for path in modules(["session.py", "engine.py", "features.py", "daemon", "cluster/client.py"]):
        assert "server" not in relative_imports(path), path


def test_the_rooms_named_in_the_readme_exist():
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    for name in ("server.py", "documents.py", "session.py", "configuration.py", "engine.py", "job.py", "errors.py", "features.py", "jobs.py", "models/"):
        assert f"`diffu_lsp/{name}`" in section, name
        assert (PACKAGE / name).exists(), name
