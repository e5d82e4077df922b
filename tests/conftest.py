"""Fixtures shared by test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def random_dream(tmp_path_factory):
    """A random-weight checkpoint in DiffuCoder/Dream's on-disk format (tests/tiny_checkpoints.py):
    for tests of mechanics, where any (garbage) text from a real forward pass will do."""
    from tiny_checkpoints import write_dream

    return write_dream(tmp_path_factory.mktemp("random-dream"))
