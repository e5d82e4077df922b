"""The LSP layer's shape (issue #27): the server only speaks LSP, in small classes, and pygls's
private state is reached from one module, pygls_adapter.py, for reasons it names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pygls

PACKAGE = Path(__file__).resolve().parent.parent / "diffu_lsp"
LSP_LAYER = ["server.py", "pygls_adapter.py", "documents.py"]  # the modules that import pygls
MAX_CLASS_LINES = 300

# Every private pygls name the adapter uses; each is explained where it is used. A new one needs
# its reason there (and an entry here); one that pygls makes public goes.
ADAPTER_PRIVATE_NAMES = {
    "_request_futures",  # pygls's futures per message: the leak fix, cancelling, pending count
    "_shutdown",  # shut down: every later request is an error; the exit status
    "_send_data",  # an error answer with "id": null
    "_handle_response",  # an unreadable response fails the request it answers
    "_execute_handler", "_check_handler_result", "_run_generator",  # notification futures dropped
    "_handle_cancel_notification",  # no warning for a late $/cancelRequest (pygls#517)
    "_apply_incremental_change", "_source",  # edits applied without walking the whole document
    "_create_text_document", "_sync_kind",  # the document class (pygls#131)
}


def pygls_private_names() -> set[str]:
    """Private attribute and method names defined in the installed pygls."""
    names = set()
    for path in Path(pygls.__file__).parent.rglob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r"self\.(_[a-z]\w*)", text)) | set(re.findall(r"def (_[a-z]\w*)", text))
    return names


def private_uses(path: Path, private: set[str]) -> set[str]:
    """pygls private names the module reads, writes or overrides, and '__class__' if it swaps one."""
    used = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and (node.attr in private or node.attr == "__class__"):
            used.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in private:
            used.add(node.name)
    return used


def class_lengths(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text(), str(path))
    return {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


def test_no_class_in_the_lsp_layer_is_over_300_lines():
    for name in LSP_LAYER:
        long = {cls: n for cls, n in class_lengths(PACKAGE / name).items() if n > MAX_CLASS_LINES}
        assert not long, (name, long)


def test_only_the_adapter_reaches_into_pygls_private_state():
    private = pygls_private_names()
    assert {"_request_futures", "_shutdown", "_converter"} <= private  # the scan finds pygls's names
    for name in LSP_LAYER:
        if name != "pygls_adapter.py":
            assert not private_uses(PACKAGE / name, private), name


def test_the_adapter_uses_only_the_private_names_it_explains():
    used = private_uses(PACKAGE / "pygls_adapter.py", pygls_private_names())
    assert used - {"__class__"} == ADAPTER_PRIVATE_NAMES
    assert "__class__" in used  # the workspace class swap (pygls#131), and nowhere else


def test_handlers_are_module_functions_of_a_few_lines():
    """Each LSP handler registered by create_server is a module-level function of a few lines
    (the work is in plain functions and the session), so adding one is a small, separate change."""
    from diffu_lsp import server

    tree = ast.parse((PACKAGE / "server.py").read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    handlers = [handler.__name__ for _, _, handler in server.FEATURES]
    assert handlers and all(name in functions for name in handlers), handlers
    long = {name: functions[name].end_lineno - functions[name].lineno + 1 for name in handlers
            if functions[name].end_lineno - functions[name].lineno + 1 > 40}
    assert not long, long
