"""The features as plain functions: document text + character offsets + settings + model -> text.

They run on the model's worker thread and are what the language server, the CLI and the
benchmarks call. No LSP here: the server converts positions to offsets before calling in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import infill
from .models import DenoiseCancelled
from .postprocess import Context, auto_closed_tail, cut_at_stop, drop_low_confidence_tail, postprocess_text
from .sampler import Sampling
from .settings import Settings, sampling_options


@dataclass(frozen=True)
class Suggestion:
    text: str              # inserted at the cursor ("" when the model had nothing worth showing)
    replace_after: int     # characters after the cursor, on its line, that the text already closes
    multiline: bool
    forwards: int
    hole_tokens: int
    seconds: float


@dataclass(frozen=True)
class Replacement:
    start: int
    end: int
    text: str


def sampling_for(model, settings: Settings, **overrides) -> Sampling:
    """The settings' sampling options over the model's own defaults (settings left unset defer)."""
    return model.sampling(**sampling_options(settings), **overrides)


def _denoise(model, canvas: list[int], settings: Settings, cancel, on_step=None):
    result = model.fill(canvas, sampling_for(model, settings), cancel=cancel, on_step=on_step,
                        cache=settings.kv_cache, refresh_every=settings.cache_refresh_steps)
    if result.cancelled:
        raise DenoiseCancelled()
    return result


def _hole_text(model, result, start: int, length: int, settings: Settings) -> str:
    ids = result.canvas[start:start + length].tolist()
    confidence = result.confidence[start:start + length].tolist()
    ids, confidence = cut_at_stop(ids, confidence, model.eos_token_ids)
    ids, confidence = drop_low_confidence_tail(ids, confidence, settings.tail_confidence)
    return model.decode(ids)


def _split_trailing_blanks(prefix: str) -> tuple[str, str]:
    """Token healing for the common case: "return |" is cut before the space, which then has to
    be the start of the model's text, as it was in every training example."""
    line = prefix[prefix.rfind("\n") + 1:]
    if not line.strip():
        return prefix, ""
    kept = prefix.rstrip(" \t")
    return kept, prefix[len(kept):]


def suggest(model, text: str, cursor: int, settings: Settings, *, cancel=None, block: bool = False) -> Suggestion:
    """The block to show at `cursor` (single- or multi-line, decided from the code around it)."""
    started = time.perf_counter()
    request = infill.build_request(text, cursor, model.encode, settings, block=block)
    model_prefix, healed = _split_trailing_blanks(request.prefix)
    prefix_ids, suffix_ids = model.encode(model_prefix), model.encode(request.suffix)
    length = request.hole_tokens
    result = _denoise(model, prefix_ids + [model.mask_token_id] * length + suffix_ids, settings, cancel)
    raw = _hole_text(model, result, len(prefix_ids), length, settings)
    if healed:
        raw = raw[len(healed):] if raw.startswith(healed) else raw.lstrip(" \t")
    context = Context(prefix=request.prefix, suffix=request.suffix, multiline=request.multiline)
    completion = postprocess_text(raw, context)
    return Suggestion(
        text=completion, replace_after=auto_closed_tail(context.line_after, completion) if completion else 0,
        multiline=request.multiline, forwards=result.forwards, hole_tokens=length,
        seconds=time.perf_counter() - started,
    )


def fill_holes(model, text: str, start: int, end: int, settings: Settings, *, cancel=None) -> list[Replacement]:
    """Every hole marker in [start, end) (or the enclosing def/class when the range is empty),
    denoised together in one canvas so each hole sees the others' context."""
    if start == end:
        start, end = infill.enclosing_block(text, start)
    holes = infill.find_holes(text, start, end, settings.hole_markers)
    if not holes:
        return []
    canvas = infill.fill_canvas(text, holes, model.encode, settings.multi_line_tokens,
                                settings.prefix_tokens, settings.suffix_tokens)
    ids, hole_starts = [], []
    for index, segment in enumerate(canvas.segments):
        ids += model.encode(segment)
        if index < len(holes):
            hole_starts.append(len(ids))
            ids += [model.mask_token_id] * canvas.hole_tokens[index]
    result = _denoise(model, ids, settings, cancel)
    replacements = []
    for hole, hole_start, length in zip(holes, hole_starts, canvas.hole_tokens):
        raw = _hole_text(model, result, hole_start, length, settings)
        context = Context(prefix=text[:hole.start], suffix=text[hole.end:], multiline=True)
        filled = postprocess_text(raw, context)
        if filled:
            replacements.append(Replacement(hole.start, hole.end, filled))
    return replacements


def refine(model, text: str, start: int, end: int, settings: Settings, *, cancel=None, on_step=None) -> str:
    """The selection text[start:end] re-masked (all of it, or its low-confidence tokens) and
    re-denoised with both sides as context."""
    prefix, selected, suffix = infill.refine_request(text, start, end, model.encode,
                                                     settings.prefix_tokens, settings.suffix_tokens)
    prefix_ids, selected_ids, suffix_ids = model.encode(prefix), model.encode(selected), model.encode(suffix)
    if not selected_ids:
        return selected
    if settings.refine_mode == "low_confidence":
        scores = model.token_probabilities(prefix_ids, selected_ids, suffix_ids)
        hole = [model.mask_token_id if s < settings.refine_confidence else t for t, s in zip(selected_ids, scores)]
        if model.mask_token_id not in hole:
            return selected
    else:  # room to grow a little; unused positions end as pad
        hole = [model.mask_token_id] * (len(selected_ids) + max(4, len(selected_ids) // 4))
    result = _denoise(model, prefix_ids + hole + suffix_ids, settings, cancel, on_step)
    new_ids = result.canvas[len(prefix_ids):len(prefix_ids) + len(hole)].tolist()
    return model.decode([t for t in new_ids if t not in model.eos_token_ids])

