"""Fixtures shared by test modules."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_runtime_dir(tmp_path_factory):
    """Servers started by the tests share a model daemon in a runtime folder of this session's
    own (never the user's), stopped at the end."""
    folder = tmp_path_factory.mktemp("runtime")
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(folder)
    yield folder
    from diffu_lsp.daemon import Paths, terminate

    if (folder / "diffu-lsp").exists():
        terminate(Paths(folder / "diffu-lsp"))
    if old is None:
        os.environ.pop("XDG_RUNTIME_DIR", None)
    else:
        os.environ["XDG_RUNTIME_DIR"] = old


@pytest.fixture(scope="session")
def random_dream(tmp_path_factory):
    """A random-weight checkpoint in DiffuCoder/Dream's on-disk format (tests/tiny_checkpoints.py):
    for tests of mechanics, where any (garbage) text from a real forward pass will do."""
    from tiny_checkpoints import write_dream

    return write_dream(tmp_path_factory.mktemp("random-dream"))
