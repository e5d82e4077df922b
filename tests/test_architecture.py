"""The rooms of diffu_lsp and the rules between them: written once, here, as data.

README's "Architecture" lists the same rooms in the same order (checked below). Each room is a
set of modules or packages of diffu_lsp; a room may import only the rooms listed after it, never
one before it, and no module may reach itself again through its imports (a cycle). Every import
counts: ``from . import x``, ``from .. import x``, ``from diffu_lsp import x``, ``import
diffu_lsp.x``, and imports inside functions. Third-party libraries that only some rooms may
import are in LIBRARIES.
"""

from __future__ import annotations

import ast
import functools
import re
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "diffu_lsp"

#: Top to bottom: (room, its modules and packages, what it is). A room imports only rooms below it.
ROOMS: list[tuple[str, tuple[str, ...], str]] = [
    ("tools", ("__main__.py", "cli.py", "bench", "evaluate.py", "train.py"),
     "the command line, the benchmarks, evaluation and the training of the bundled model"),
    ("lsp", ("server.py", "nextedit_lsp.py", "pygls_adapter.py", "documents.py"),
     "the LSP handlers, next-edit predictions as diagnostics, the one place that reaches into pygls's "
     "private state, and documents with LSP's positions: the only room that imports pygls"),
    ("session", ("session.py",),
     "one editor window without pygls: the engine in use, the scheduler, the suggestion cache"),
    ("configuration", ("configuration.py",),
     "a window's settings layers, the TOML files, their trust and the file watcher"),
    ("cluster", ("cluster",),
     "the team cluster: Ray Serve replicas (app.py), their HTTP gate and the ClusterEngine client"),
    ("daemon", ("daemon",),
     "the machine's model daemon: its socket, host and the DaemonEngine client"),
    ("engine", ("engine.py",),
     "the Engine contract and LocalEngine, the model in this process"),
    ("job host", ("job_host.py",),
     "the host side of a job, one copy for the in-process engine, the daemon and the replicas: run_job, JobHost"),
    ("job path", ("features.py",),
     "the one job path: a Request and a model in, an answer out (fit, infill, sample, post-process)"),
    ("protocol", ("protocol.py",),
     "the job protocol: typed frames, one codec, errors into frames and back (msgspec)"),
    ("api", ("__init__.py",),
     "the package's Python API (load_model, denoise) and its version"),
    ("models", ("models",),
     "the model backend: loading checkpoints and running the network"),
    ("scheduler", ("scheduler.py",),
     "a generic job scheduler: one worker thread, debounce, latest-wins, cancellation"),
    ("sampler", ("sampler.py",),
     "the sampler: a canvas of masks to tokens, one denoising step at a time (torch only)"),
    ("next edit", ("nextedit.py",),
     "the edits an edit implies: finding the edit, its candidate spans, tracking predictions (pure)"),
    ("postprocess", ("postprocess.py",),
     "trimming a hole's text to what fits the code around it (pure)"),
    ("infill", ("infill.py",),
     "holes, their canvases and what lies between them (pure)"),
    ("warm start", ("warm_start.py",),
     "the last canvas of each document lined up with the next request (pure, no torch)"),
    ("job types", ("job.py",),
     "the job types: Request, Suggestion, Replacement, ModelKey, ModelInfo, Step (msgspec data)"),
    ("settings", ("settings.py",),
     "every setting, its default, bounds and user text (msgspec)"),
    ("ownership", ("ownership.py",),
     "files only this user may have made, opened without following a symlink and checked once open"),
    ("errors", ("errors.py",),
     "one error hierarchy under DiffuError"),
]

#: Libraries that only the named rooms may import (anywhere in a module, lazily too).
LIBRARIES = {
    "pygls": ("lsp",),
    "lsprotocol": ("lsp",),
    "transformers": ("models", "tools"),
    "torch": ("tools", "cluster", "job path", "models", "sampler"),
    "numpy": ("tools",),
}

#: Folders of diffu_lsp that hold no modules of the package.
NOT_CODE = ("assets",)


def module_name(path: Path, root: Path) -> str:
    """'diffu_lsp.daemon.host' for root/daemon/host.py, 'diffu_lsp.daemon' for its __init__.py."""
    parts = ("diffu_lsp",) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))
            if not set(p.relative_to(root).parts) & set(NOT_CODE)}


@functools.lru_cache(maxsize=None)
def import_statements(source: str) -> tuple[tuple[int, str, tuple[str, ...]], ...]:
    """(level, module, names) of every import in the source, wherever it stands (lazy ones too);
    `import a.b` is (0, "", ("a.b",)). Cached by source: the planted copies differ in one file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(0, "", (alias.name,)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or "", tuple(alias.name for alias in node.names)))
    return tuple(found)


def from_imports(path: Path, name: str) -> list[tuple[str, tuple[str, ...]]]:
    """(absolute module, names) of each `from ... import names` in the module `name` at path, with
    relative ones resolved; `import a.b` is ("", ("a.b",))."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    resolved = []
    for level, module, names in import_statements(path.read_text()):
        if level:
            parts = package.split(".")
            module = ".".join(parts[:len(parts) - level + 1] + ([module] if module else []))
        resolved.append((module, names))
    return resolved


def imports(path: Path, name: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(modules of the package, top-level third-party names) that the module imports anywhere."""
    ours, theirs = set(), set()
    for base, names in from_imports(path, name):
        tops = {x.split(".")[0] for x in names} if not base else {base.split(".")[0]}
        if tops != {"diffu_lsp"}:
            theirs |= tops
        elif not base:  # import diffu_lsp.x
            ours |= set(names)
        else:  # `from base import x`: the submodule base.x where there is one, else base itself
            ours |= {f"{base}.{x}" if f"{base}.{x}" in known else base for x in names}
    return {m for m in ours if m in known}, theirs


def room_of(name: str, root: Path) -> str | None:
    relative = name.split(".")[1:]
    for room, members, _ in ROOMS:
        for member in members:
            parts = tuple(Path(member).with_suffix("").parts) if member.endswith(".py") else (member,)
            if parts == ("__init__",) and not relative:
                return room
            if parts != ("__init__",) and tuple(relative[:len(parts)]) == parts:
                return room
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once, as the modules along it (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    """Every break of the rules in the package at root, one line each."""
    modules = package_modules(root)
    order = [room for room, _, _ in ROOMS]
    graph, problems = {}, []
    for name, path in modules.items():
        ours, theirs = imports(path, name, set(modules))
        graph[name] = ours - {name}
        room = room_of(name, root)
        if room is None:
            problems.append(f"{name} is in no room: add it to ROOMS")
            continue
        for target in sorted(graph[name]):
            other = room_of(target, root)
            if other is not None and order.index(other) < order.index(room):
                problems.append(f"{name} ({room}) imports {target} ({other}), a room above it")
        for library in sorted(theirs & set(LIBRARIES)):
            if room not in LIBRARIES[library]:
                problems.append(f"{name} ({room}) imports {library}, allowed only in {LIBRARIES[library]}")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def test_the_package_keeps_the_rooms():
    assert violations() == []


def test_every_room_exists():
    for room, members, _ in ROOMS:
        for member in members:
            assert (PACKAGE / member).exists(), (room, member)


PLANTED = [
    ("engine.py", "from . import session\n", "diffu_lsp.engine (engine) imports diffu_lsp.session (session)"),
    ("features.py", "from . import server\n", "diffu_lsp.features (job path) imports diffu_lsp.server (lsp)"),
    ("session.py", "from diffu_lsp import server\n", "diffu_lsp.session (session) imports diffu_lsp.server (lsp)"),
    ("sampler.py", "def later():\n    import diffu_lsp.models.loading\n",
     "diffu_lsp.sampler (sampler) imports diffu_lsp.models.loading (models)"),
    ("daemon/client.py", "from .. import session\n", "diffu_lsp.daemon.client (daemon) imports diffu_lsp.session"),
    ("job.py", "import pygls\n", "diffu_lsp.job (job types) imports pygls"),
    ("scheduler.py", "def later():\n    import torch\n", "diffu_lsp.scheduler (scheduler) imports torch"),
]


@pytest.mark.parametrize("module,line,report", PLANTED, ids=[p[0] + ":" + p[1].strip() for p in PLANTED])
def test_a_planted_bad_import_is_reported(tmp_path, module, line, report):
    copy = tmp_path / "diffu_lsp"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + "\n" + line)
    assert any(problem.startswith(report) for problem in violations(copy)), violations(copy)


def test_a_planted_cycle_inside_one_room_is_reported(tmp_path):
    copy = tmp_path / "diffu_lsp"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    (copy / "daemon" / "__init__.py").write_text((copy / "daemon" / "__init__.py").read_text()
                                                  + "\ndef later():\n    from . import client\n")
    (copy / "daemon" / "client.py").write_text((copy / "daemon" / "client.py").read_text() + "\nfrom . import Paths\n")
    assert "import cycle: diffu_lsp.daemon -> diffu_lsp.daemon.client" in violations(copy)


def test_a_module_in_no_room_is_reported(tmp_path):
    copy = tmp_path / "diffu_lsp"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    (copy / "stray.py").write_text("")
    assert violations(copy) == ["diffu_lsp.stray is in no room: add it to ROOMS"]


def exception_classes(root: Path = PACKAGE) -> dict[str, list[str]]:
    """Module -> the classes it defines that derive from an exception (a builtin one, or one of
    errors.py's), by the names of their bases."""
    import builtins

    known = {name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)}
    known |= {node.name for node in ast.parse((root / "errors.py").read_text()).body if isinstance(node, ast.ClassDef)}
    found = {}
    for name, path in package_modules(root).items():
        for node in ast.walk(ast.parse(path.read_text())):
            bases = {getattr(base, "id", getattr(base, "attr", "")) for base in getattr(node, "bases", [])}
            if isinstance(node, ast.ClassDef) and bases & known:
                found.setdefault(name, []).append(node.name)
    return found


def test_every_exception_class_is_in_errors_under_one_base():
    from diffu_lsp import errors

    assert list(exception_classes()) == ["diffu_lsp.errors"], exception_classes()
    classes = [value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, BaseException)]
    assert all(issubclass(cls, errors.DiffuError) for cls in classes)
    names = [cls.__name__ for cls in classes]
    assert len(names) == len(set(names)) and all(name in errors.__doc__ for name in names)  # drawn in the tree


def second_import_paths(root: Path = PACKAGE, tests: Path = PACKAGE.parent / "tests") -> list[str]:
    """Imports of a class of the package from a module other than the one that defines it (a
    re-export): one type, one import path. `from .daemon.client import DaemonLost` once DaemonLost
    lives in errors.py is one."""
    modules = package_modules(root)
    home: dict[str, set[str]] = {}
    for name, path in modules.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                home.setdefault(node.name, set()).add(name)
    wrong = []
    for path in [*modules.values(), *sorted(tests.glob("*.py"))]:
        name = module_name(path, root) if path.is_relative_to(root) else "tests"
        for base, names in from_imports(path, name):
            if base.split(".")[0] == "diffu_lsp":
                wrong += [f"{path.name}: {x} from {base}, defined in {sorted(home[x])}" for x in names
                          if x in home and base not in home[x]]
    return wrong


def test_each_class_is_imported_from_the_module_that_defines_it():
    assert second_import_paths() == []


def test_a_planted_re_export_is_reported(tmp_path):
    copy = tmp_path / "diffu_lsp"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    (copy / "session.py").write_text((copy / "session.py").read_text() + "\nfrom .engine import ModelKey\n")
    assert second_import_paths(copy, tmp_path) == [
        "session.py: ModelKey from diffu_lsp.engine, defined in ['diffu_lsp.job']"]


def test_a_planted_exception_class_outside_errors_is_reported(tmp_path):
    copy = tmp_path / "diffu_lsp"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    (copy / "daemon" / "client.py").write_text((copy / "daemon" / "client.py").read_text()
                                               + "\n\nclass OutOfMemoryError(OutOfMemory, RuntimeError):\n    pass\n")
    assert exception_classes(copy)["diffu_lsp.daemon.client"] == ["OutOfMemoryError"]


def test_the_readme_lists_the_rooms_in_this_order():
    """README's Architecture: each room of ROOMS, in this order, with its modules and the libraries
    LIBRARIES lets it use."""
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    entries = re.findall(r"^\d+\. \*\*([^*]+)\*\* — (.*?)(?=^\d+\. \*\*|^$)", section, re.M | re.S)
    assert [room for room, _ in entries] == [room for room, _, _ in ROOMS]
    for (room, members, _), (_, text) in zip(ROOMS, entries):
        for member in members:
            assert f"`diffu_lsp/{member if member.endswith('.py') else member + '/'}`" in text, (room, member)
        libraries = sorted(library for library, rooms in LIBRARIES.items() if room in rooms)
        listed = re.search(r"Libraries: ([\w, ]+)", " ".join(text.split()))
        assert (sorted(x.strip() for x in listed.group(1).split(",")) if listed else []) == libraries, room


def test_the_readme_layout_names_every_room_and_only_paths_that_exist():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths = re.findall(r"`([\w.-]+/[\w./-]*)`", layout)
    assert paths and all((PACKAGE.parent / path).exists() for path in paths), [p for p in paths if not (PACKAGE.parent / p).exists()]
    for room, members, _ in ROOMS:
        for member in members:
            assert f"`diffu_lsp/{member if member.endswith('.py') else member + '/'}`" in layout, (room, member)


#: No class of diffu_lsp is longer than this many lines (decorators and docstring included).
MAX_CLASS_LINES = 300
#: Classes over the limit, each with who is splitting it; an entry must go once its class fits.
OVERSIZED: dict[str, str] = {}


def class_sizes(root: Path = PACKAGE) -> dict[str, int]:
    sizes = {}
    for name, path in package_modules(root).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                sizes[f"{name}.{node.name}"] = node.end_lineno - first + 1
    return sizes


def test_no_class_is_over_300_lines():
    sizes = class_sizes()
    assert {name: size for name, size in sizes.items() if size > MAX_CLASS_LINES and name not in OVERSIZED} == {}
    assert {name for name in OVERSIZED if sizes.get(name, 0) <= MAX_CLASS_LINES} == set(), "remove it from OVERSIZED"


def test_a_planted_long_class_is_reported(tmp_path):
    copy = tmp_path / "diffu_lsp"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    (copy / "job.py").write_text((copy / "job.py").read_text() + "\n\nclass Long:\n" + "    x = 1\n" * 300)
    assert class_sizes(copy)["diffu_lsp.job.Long"] == 301
