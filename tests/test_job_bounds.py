"""Bounds before work on the one job path (#24, finding 7): a fill-holes or refine job over a whole
file, or a hole of millions of tokens, is refused with one line saying which bound, before its
text is tokenized (or, where only the tokens tell, before it is denoised): the in-process engine,
the daemon and the cluster all run jobs through features.answer."""

from __future__ import annotations

import msgspec
import pytest

from diffu_lsp import features
from diffu_lsp.errors import RequestTooLarge
from diffu_lsp.job import Request
from diffu_lsp.models import load_model
from diffu_lsp.settings import Settings


@pytest.fixture(scope="module")
def model():
    return load_model(None, device="cpu", dtype="float32")


@pytest.fixture
def watched(model, monkeypatch):
    """Records the length of every text the job tokenizes; denoising anything fails the test."""
    encoded = []
    encode = model.encode

    def recording_encode(text, *args, **kwargs):
        encoded.append(len(text))
        return encode(text, *args, **kwargs)

    def no_denoising(*args, **kwargs):
        raise AssertionError("a job over the bounds was denoised")

    monkeypatch.setattr(model, "encode", recording_encode)
    monkeypatch.setattr(model, "fill", no_denoising)
    return encoded


def job(kind: str, text: str, start: int, end: int, **settings) -> Request:
    return Request(kind, text, start, end, msgspec.convert(settings, Settings))


def test_a_huge_selection_is_refused_before_it_is_tokenized(model, watched):
    body = "".join(f"    total += values[{i}] * weights[{i}]\n" for i in range(6000))
    text = "def f(values, weights):\n    total = 0\n" + body + "    return total\n"
    with pytest.raises(RequestTooLarge, match=r"^refine: .* over the 8,192 a job may denoise at once; the selection "
                                              r"has [\d,]+ characters: select less"):
        features.answer(model, job("refine", text, 0, len(text)))
    assert watched == []


def test_a_selection_over_the_canvas_in_tokens_is_refused_before_denoising(model, watched):
    text = "x = [" + ", ".join(["0"] * 5000) + "]\n"  # few characters per token: only the tokens tell
    with pytest.raises(RequestTooLarge, match="^refine: .*the selection is [\\d,]+ tokens: select less"):
        features.answer(model, job("refine", text, 0, len(text)))


def test_too_many_holes_are_refused_before_anything_is_tokenized(model, watched):
    text = "def f():\n" + "    pass  # TODO\n" * 200
    with pytest.raises(RequestTooLarge, match="^fill holes: 200 holes, over the 64 one job fills; select fewer"):
        features.answer(model, job("fill_holes", text, 0, len(text)))
    assert watched == []


def test_holes_far_apart_are_refused_before_anything_is_tokenized(model, watched):
    filler = "".join(f"    y{i} = {i} * {i}\n" for i in range(10_000))
    text = "def f():\n    ...\n" + filler + "    ...\n"
    with pytest.raises(RequestTooLarge, match="^fill holes: .*select fewer holes, closer together"):
        features.answer(model, job("fill_holes", text, 0, len(text)))
    assert watched == []


def test_a_hole_of_millions_of_tokens_is_refused_before_it_is_made(model, watched):
    text = "def f(x):\n    return "
    with pytest.raises(RequestTooLarge, match="^suggestion: 10,000,000 tokens or more.*lower singleLineTokens"):
        features.answer(model, job("block", text, len(text), len(text), blockTokens=10_000_000))


def test_jobs_within_the_bounds_still_run(model):
    text = "def f():\n" + "    pass  # TODO\n" * 3
    small = {"multiLineTokens": 4, "prefixTokens": 32, "suffixTokens": 8}
    assert isinstance(features.answer(model, job("fill_holes", text, 0, len(text), **small)), list)
    text = "def f(x):\n    return x + 1\n"
    assert isinstance(features.answer(model, job("refine", text, 14, 22, **small)), str)
