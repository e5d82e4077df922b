"""The features as plain functions: document text + character offsets + settings + model -> text.

They run on the model's worker thread and are what the language server, the CLI and the
benchmarks call. No LSP here: the server converts positions to offsets before calling in.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import msgspec

from . import infill, warm_start
from .errors import JobCancelled, RequestTooLarge, is_out_of_memory
from .job import Answer, Replacement, Request, Step, Suggestion
from .postprocess import Context, auto_closed_tail, cut_at_stop, drop_low_confidence_tail, postprocess_text
from .sampler import Sampling
from .settings import Settings, sampling_options


log = logging.getLogger("diffu_lsp.features")

ALTERNATIVE_TEMPERATURE = 0.8  # the other candidates of a suggestion (setting candidates) sample at least this hot

BETWEEN_HOLES = " ┊ "  # joins the holes' drafts in a fill-holes job's streamed draft
# Bounds checked before any tokenizing (a lower bound of the tokens from the characters), and on the
# exact canvas before denoising: a fill-holes or refine job over a whole file tied a daemon up for
# 46 s and 2.5 GB. The defaults make canvases of about 1,100 tokens.
MAX_CANVAS_TOKENS = 8192  # positions of one job's canvas: context, holes and what lies between
MAX_HOLES = 64  # holes of one fill-holes job


def check_canvas(tokens: int, what: str, hint: str) -> None:
    """Refuse a job whose canvas has (or, counted from characters, must have) over
    :data:`MAX_CANVAS_TOKENS` tokens: one line naming the job, the size and what to do."""
    if tokens > MAX_CANVAS_TOKENS:
        raise RequestTooLarge(f"{what}: {tokens:,} tokens or more, over the {MAX_CANVAS_TOKENS:,} a job may "
                              f"denoise at once; {hint}")


def at_least_tokens(characters: int) -> int:
    """The fewest tokens ``characters`` of text can be (no token covers more than
    infill.MAX_CHARS_PER_TOKEN characters): known before tokenizing."""
    return -(-characters // infill.MAX_CHARS_PER_TOKEN)


def sampling_for(model, settings: Settings, **overrides) -> Sampling:
    """The settings' sampling options over the model's own defaults (settings left unset defer)."""
    return model.sampling(**sampling_options(settings), **overrides)


def _denoise(model, canvas: list[int], settings: Settings, cancel, on_step=None, provisional=None, keep=None,
             seed: int | None = None):
    """The filled canvas; `keep(result)` sees it first, also when the job was cancelled (warm start).
    `seed`: sample (at ALTERNATIVE_TEMPERATURE at least) from a generator seeded with it."""
    sampling, generator = sampling_for(model, settings), None
    if seed is not None:
        import torch  # loaded already: the model is

        sampling = sampling.with_options(temperature=max(settings.temperature, ALTERNATIVE_TEMPERATURE))
        generator = torch.Generator().manual_seed(seed)
    result = model.fill(canvas, sampling, cancel=cancel, on_step=on_step, generator=generator,
                        cache=settings.kv_cache, refresh_every=settings.cache_refresh_steps, compiled=settings.compile,
                        reuse_prefix=settings.reuse_keys, provisional=provisional)
    if keep is not None:
        keep(result)
    if result.cancelled:
        raise JobCancelled("cancelled while denoising")
    return result


def _streamed(model, on_step: Callable[[Step], Any] | None, spans: list[tuple[int, int]], healed: str = ""):
    """The sampler's per-step callback for `on_step`: a :class:`Step` whose text is the draft so far
    in the canvas `spans` ((start, length) of each hole): the streamed draft a command shows
    (without `healed`, the blanks a hole took over from before it: see _split_trailing_blanks)."""
    if on_step is None:
        return None

    def step(state) -> bool | None:
        texts = [warm_start.draft_text(state.canvas[start:start + length].tolist(), mask_id=model.mask_token_id,
                                  decode=model.decode, stop_ids=model.eos_token_ids) for start, length in spans]
        texts = [_without_healed(text, healed) for text in texts]
        return on_step(Step(state.step, state.masked, BETWEEN_HOLES.join(texts)))

    return step


def _hole_text(model, result, start: int, length: int, settings: Settings) -> str:
    ids = result.canvas[start:start + length].tolist()
    confidence = result.confidence[start:start + length].tolist()
    ids, confidence = cut_at_stop(ids, confidence, model.eos_token_ids)
    ids, confidence = drop_low_confidence_tail(ids, confidence, settings.tail_confidence)
    return model.decode(ids)


def _split_trailing_blanks(prefix: str) -> tuple[str, str]:
    """Token healing for the common cases: "return |" is cut before the space, and an indented
    empty line before its indentation, which then has to be the start of the model's text, as it
    was in every training example (a tokenizer joins the last blank to the next word: "   " +
    " return", never "    " + "return"). Measured with the quality suite's edit similarity on
    the server's single-line path: HumanEval 3.7 -> 12.5, held-out stdlib 13.4 -> 15.2."""
    kept = prefix.rstrip(" \t")
    return kept, prefix[len(kept):]


def _without_healed(text: str, healed: str) -> str:
    """The model's text for a hole that took over the blanks `healed` (_split_trailing_blanks),
    without them: they stay in the document where they were."""
    if not healed:
        return text
    return text[len(healed):] if text.startswith(healed) else text.lstrip(" \t")


def suggest(model, text: str, cursor: int, settings: Settings, *, cancel=None, block: bool = False,
            on_step=None, drafts: warm_start.CanvasStore | None = None, key: str = "") -> Suggestion:
    """The block to show at `cursor` (single- or multi-line, decided from the code around it).
    With `drafts` and `settings.warm_start`, the hole starts from the last canvas kept under `key`
    (diffu_lsp/warm_start.py), and this job's canvas is kept there for the next one, even if cancelled."""
    started = time.perf_counter()
    request = infill.build_request(text, cursor, model.encode, settings, block=block)
    check_canvas(request.hole_tokens, "suggestion", "lower singleLineTokens, multiLineTokens or blockTokens")
    model_prefix, healed = _split_trailing_blanks(request.prefix)
    prefix_ids, suffix_ids = model.encode(model_prefix), model.encode(request.suffix)
    length = request.hole_tokens
    check_canvas(len(prefix_ids) + length + len(suffix_ids), "suggestion", "lower prefixTokens or suffixTokens")
    hole, provisional, keep = [model.mask_token_id] * length, None, None
    if drafts is not None and settings.warm_start:
        hole_start = cursor - len(healed)
        aligned = warm_start.align(drafts.get(key), text, hole_start, cursor, length, mask_id=model.mask_token_id,
                              piece=lambda token: model.decode([token]), stop_ids=model.eos_token_ids)
        if aligned is not None:
            hole = aligned.ids
            provisional = [False] * len(prefix_ids) + aligned.provisional + [False] * len(suffix_ids)
        keep = lambda result: drafts.put(key, warm_start.canvas_of(  # noqa: E731 - finished or cancelled, for the next job
            text, hole_start, cursor, result.canvas[len(prefix_ids):len(prefix_ids) + length].tolist()))
    result = _denoise(model, prefix_ids + hole + suffix_ids, settings, cancel,
                      _streamed(model, on_step, [(len(prefix_ids), length)], healed), provisional, keep)
    context = Context(prefix=request.prefix, suffix=request.suffix, multiline=request.multiline)

    def candidate(result) -> tuple[str, int]:
        raw = _hole_text(model, result, len(prefix_ids), length, settings)
        text = postprocess_text(_without_healed(raw, healed), context)
        return text, auto_closed_tail(context.line_after, text) if text else 0

    completion, replace_after = candidate(result)
    forwards, seen, alternatives = result.forwards, {completion}, []
    for seed in range(1, settings.candidates):  # the others, from a fresh hole: sampled, seeded
        other = _denoise(model, prefix_ids + [model.mask_token_id] * length + suffix_ids, settings, cancel, seed=seed)
        forwards += other.forwards
        text, tail = candidate(other)
        if text and text not in seen:
            seen.add(text)
            alternatives.append((text, tail))
    if not completion and alternatives:
        (completion, replace_after), alternatives = alternatives[0], alternatives[1:]
    return Suggestion(
        text=completion, replace_after=replace_after, multiline=request.multiline, forwards=forwards,
        hole_tokens=length, seconds=time.perf_counter() - started, drafted=result.drafted, remasked=result.remasked,
        alternatives=tuple(alternatives),
    )


def _canvas_ids(model, canvas: infill.HoleCanvas) -> tuple[list[int], list[int]]:
    """The canvas's token ids (each hole masked) and where each hole starts in them."""
    ids, hole_starts = [], []
    for index, segment in enumerate(canvas.segments):
        ids += model.encode(segment)
        if index < len(canvas.hole_tokens):
            hole_starts.append(len(ids))
            ids += [model.mask_token_id] * canvas.hole_tokens[index]
    return ids, hole_starts


def fill_holes(model, text: str, start: int, end: int, settings: Settings, *, cancel=None,
               on_step=None) -> list[Replacement]:
    """Every hole marker in [start, end) (or the enclosing def/class when the range is empty),
    denoised together in one canvas so each hole sees the others' context."""
    holes = infill.holes_in_range(text, start, end, settings.hole_markers)
    if not holes:
        return []
    if len(holes) > MAX_HOLES:
        raise RequestTooLarge(f"fill holes: {len(holes):,} holes, over the {MAX_HOLES} one job fills; select fewer")
    between = holes[-1].start - holes[0].end - sum(h.end - h.start for h in holes[1:-1])
    check_canvas(len(holes) * settings.multi_line_tokens + at_least_tokens(between), "fill holes",
                 "select fewer holes, closer together, or lower multiLineTokens")
    canvas = infill.fill_canvas(text, holes, model.encode, settings.multi_line_tokens,
                                settings.prefix_tokens, settings.suffix_tokens)
    ids, hole_starts = _canvas_ids(model, canvas)
    spans = list(zip(hole_starts, canvas.hole_tokens))
    check_canvas(len(ids), "fill holes", "select fewer holes, closer together, or lower multiLineTokens")
    result = _denoise(model, ids, settings, cancel, _streamed(model, on_step, spans))
    replacements = []
    for hole, hole_start, length in zip(holes, hole_starts, canvas.hole_tokens):
        raw = _hole_text(model, result, hole_start, length, settings)
        context = Context(prefix=text[:hole.start], suffix=text[hole.end:], multiline=True)
        filled = postprocess_text(raw, context)
        if not text[text.rfind("\n", 0, hole.start) + 1:hole.start].strip():
            filled = filled.lstrip(" \t")  # a marker that starts its line: write at its indentation
        if filled:
            replacements.append(Replacement(hole.start, hole.end, filled))
    return replacements


def refine(model, text: str, start: int, end: int, settings: Settings, *, cancel=None, on_step=None) -> str:
    """The selection text[start:end] re-masked and re-denoised with both sides as context: all of
    it, or (`low_confidence`) as a draft, the way warm start treats the last suggestion: the tokens
    the model doubts, each scored while masked, are masked; the others stay as provisional tokens,
    re-checked every forward and masked again once the model no longer supports them. With token
    editing (the model's `edit_threshold`) nothing is masked: the whole selection is the draft, and
    the sampler replaces the tokens the model is sure are wrong."""
    check_canvas(at_least_tokens(end - start), "refine", f"the selection has {end - start:,} characters: select less")
    prefix, selected, suffix = infill.refine_request(text, start, end, model.encode,
                                                     settings.prefix_tokens, settings.suffix_tokens)
    if not selected:
        return selected
    # token healing, as for a suggestion: a selection that starts after indentation takes the last
    # blanks with it, so the model sees "   " + " return", as in training, not "    " + "return"
    prefix, healed = _split_trailing_blanks(prefix)
    prefix_ids, selected_ids, suffix_ids = model.encode(prefix), model.encode(healed + selected), model.encode(suffix)
    check_canvas(len(prefix_ids) + len(selected_ids) + max(4, len(selected_ids) // 4) + len(suffix_ids), "refine",
                 f"the selection is {len(selected_ids):,} tokens: select less")
    provisional = None
    if settings.refine_mode == "low_confidence" and sampling_for(model, settings).edit_threshold is not None:
        # a model that edits judges the selection as it stands: every token goes in as a draft (T2T)
        hole = list(selected_ids)
        provisional = [False] * len(prefix_ids) + [True] * len(hole) + [False] * len(suffix_ids)
    elif settings.refine_mode == "low_confidence":
        scores = model.token_probabilities(prefix_ids, selected_ids, suffix_ids)
        hole = [model.mask_token_id if s < settings.refine_confidence else t for t, s in zip(selected_ids, scores)]
        if model.mask_token_id not in hole:
            return selected
        provisional = [False] * len(prefix_ids) + [t != model.mask_token_id for t in hole] + [False] * len(suffix_ids)
    else:  # room to grow a little; unused positions end as pad
        hole = [model.mask_token_id] * (len(selected_ids) + max(4, len(selected_ids) // 4))
    result = _denoise(model, prefix_ids + hole + suffix_ids, settings, cancel,
                      _streamed(model, on_step, [(len(prefix_ids), len(hole))], healed), provisional)
    new_ids = result.canvas[len(prefix_ids):len(prefix_ids) + len(hole)].tolist()
    refined = model.decode([t for t in new_ids if t not in model.eos_token_ids])
    return _without_healed(refined, healed)


def next_edit(model, text: str, spans, settings: Settings, *, cancel=None) -> list[Replacement]:
    """Next-edit prediction (diffu_lsp/nextedit.py finds the ``spans``: (start, end, plain
    replacement, prior)): every span masked, each as many tokens as its plain replacement, and all
    denoised together in one canvas. A span's new text is the model's where it differs from the
    span's text and its least confident token passes ``settings.next_edit_confidence``; else the
    plain replacement where the prior passes that gate and the model does not confidently keep
    the text as it is."""
    if not spans:
        return []
    gate = settings.next_edit_confidence
    holes, sizes, blanks = [], [], []
    for start, end, guess, _ in spans:  # a blank before the span is the hole's: a tokenizer joins it to the word
        blank = text[start - 1:start] if text[start - 1:start] in (" ", "\t") else ""
        holes.append(infill.Hole(start - len(blank), end))
        blanks.append(blank)
        sizes.append(max(1, len(model.encode(blank + guess))))
    check_canvas(sum(sizes) + at_least_tokens(holes[-1].start - holes[0].end), "next edit", "fewer candidates")
    ids, hole_starts, provisional, editable = _next_edit_canvas(model, text, holes, sizes, settings)
    limit = getattr(model, "max_length", None)
    if isinstance(limit, int) and len(ids) > limit:  # the text between the spans takes room from the context
        before, after = hole_starts[0], len(ids) - hole_starts[-1] - sizes[-1]  # context tokens in the canvas
        over = len(ids) - limit + 8  # and the seams'
        prefix, suffix = split_context(before + after - over, before, after)
        smaller = msgspec.structs.replace(settings, prefix_tokens=prefix, suffix_tokens=suffix)
        ids, hole_starts, provisional, editable = _next_edit_canvas(model, text, holes, sizes, smaller)
        if len(ids) > limit:
            raise RequestTooLarge(f"next edit: the candidates' span is over the model's {limit:,} positions; "
                                  "fewer candidates")
    check_canvas(len(ids), "next edit", "fewer candidates")
    result = _denoise(model, ids, settings, cancel, provisional=provisional)
    out = []
    for start, end, low, high in editable:  # visible tokens the model replaced (T2T) near a candidate
        new = model.decode(result.canvas[low:high].tolist())
        if new != text[start:end] and new.strip() and "\n" not in new and \
                min(result.confidence[low:high].tolist()) >= gate:
            out.append(Replacement(start, end, new))
    for (start, end, guess, prior), blank, hole_start, size in zip(spans, blanks, hole_starts, sizes):
        tokens = result.canvas[hole_start:hole_start + size].tolist()
        confidence = result.confidence[hole_start:hole_start + size].tolist()
        tokens, confidence = cut_at_stop(tokens, confidence, model.eos_token_ids)
        new = model.decode(tokens)
        new = new[len(blank):] if new.startswith(blank) else new.lstrip(" \t")
        sure = min(confidence, default=0.0) >= gate and bool(new.strip()) and "\n" not in new
        if sure and new != text[start:end]:
            out.append(Replacement(start, end, new))
        elif prior >= gate and not (sure and new == text[start:end]) and guess != text[start:end]:
            out.append(Replacement(start, end, guess))
    return sorted(out, key=lambda r: r.start)


def _next_edit_canvas(model, text: str, holes: list[infill.Hole], sizes: list[int], settings: Settings):
    """The next-edit canvas at the settings' context budgets: (ids, hole starts, provisional flags
    or None, editable pieces: (text start, end, canvas start, end) of the candidates' lines)."""
    canvas = infill.fill_canvas(text, holes, model.encode, sizes, settings.prefix_tokens, settings.suffix_tokens)
    if sampling_for(model, settings).edit_threshold is not None:  # a model that edits: the rest of those lines too
        return _editable_canvas(model, canvas, holes)
    ids, hole_starts = _canvas_ids(model, canvas)
    return ids, hole_starts, None, []


def _editable_canvas(model, canvas: infill.HoleCanvas, holes: list[infill.Hole]):
    """:func:`_canvas_ids`, with the text on each hole's line (beside the hole) encoded on its own
    and marked provisional, so that a model that edits may replace it: (ids, hole starts,
    provisional flags, [(text start, text end, canvas start, canvas end)] of those pieces)."""
    ids, hole_starts, provisional, editable = [], [], [], []
    offset, last = holes[0].start - len(canvas.segments[0]), len(canvas.segments) - 1
    for index, segment in enumerate(canvas.segments):
        head_end = 0 if index == 0 else (len(segment) if "\n" not in segment else segment.index("\n"))
        tail_start = len(segment) if index == last else segment.rfind("\n") + 1
        if head_end >= tail_start:  # no line break between two holes: all of it is on their line
            pieces = [(0, len(segment), index not in (0, last))]
        else:
            pieces = [(0, head_end, True), (head_end, tail_start, False), (tail_start, len(segment), True)]
        for a, b, on_line in pieces:
            piece = model.encode(segment[a:b]) if b > a else []
            editing = on_line and bool(segment[a:b].strip())
            if editing:
                editable.append((offset + a, offset + b, len(ids), len(ids) + len(piece)))
            ids += piece
            provisional += [editing] * len(piece)
        offset += len(segment)
        if index < len(holes):
            hole_starts.append(len(ids))
            ids += [model.mask_token_id] * canvas.hole_tokens[index]
            provisional += [False] * canvas.hole_tokens[index]
            offset += holes[index].end - holes[index].start
    return ids, hole_starts, provisional, editable


# ------------------------------------------------------------------ one request, whichever kind

def answer(model, request: Request, *, cancel=None, on_step=None, on_oom_retry: Callable[[], Any] = lambda: None,
           drafts: warm_start.CanvasStore | None = None, key: str = "") -> Answer:
    """Answer one :class:`~diffu_lsp.job.Request`: settings fitted to the model's positions,
    and after running out of memory, once more with smaller holes. `drafts`: the engine's last
    canvas per document (`key`), for warm start."""
    text, start, end = request.text, request.start, request.end

    def once(settings: Settings) -> Answer:
        if request.kind in ("suggest", "block"):
            return suggest(model, text, start, settings, cancel=cancel, block=request.kind == "block", on_step=on_step,
                           drafts=drafts, key=key)
        if request.kind == "fill_holes":
            return fill_holes(model, text, start, end, settings, cancel=cancel, on_step=on_step)
        if request.kind == "next_edit":
            return next_edit(model, text, request.spans, settings, cancel=cancel)
        return refine(model, text, start, end, settings, cancel=cancel, on_step=on_step)

    return retry_on_oom(once, fit_to_model(request.settings, model), on_oom_retry)


def smaller(settings: Settings) -> Settings:
    """Half the holes and context windows: the retry after running out of memory."""
    half = lambda n: max(1, n // 2)  # noqa: E731
    return msgspec.structs.replace(
        settings, single_line_tokens=half(settings.single_line_tokens),
        multi_line_tokens=half(settings.multi_line_tokens), block_tokens=half(settings.block_tokens),
        prefix_tokens=half(settings.prefix_tokens), suffix_tokens=settings.suffix_tokens // 2)


def retry_on_oom(run: Callable[[Settings], Any], settings: Settings, on_retry: Callable[[], Any] = lambda: None):
    """``run(settings)``; after an out-of-memory error, once more with :func:`smaller` settings."""
    try:
        return run(settings)
    except Exception as error:  # noqa: BLE001
        if not is_out_of_memory(error):
            raise
        log.warning("out of memory; retrying with a smaller hole: %s", str(error).splitlines()[0] if str(error) else "")
    # Outside the except block, so the failed attempt's tensors can be freed first.
    on_retry()
    return run(smaller(settings))


def fit_to_model(settings: Settings, model) -> Settings:
    """Shrink the context budgets so that prefix + largest hole + suffix fits the model's
    positions (a checkpoint with 512 positions would otherwise fail on every long file)."""
    limit = getattr(model, "max_length", None)
    if not isinstance(limit, int):
        return settings
    hole = max(settings.single_line_tokens, settings.multi_line_tokens, settings.block_tokens)
    room = limit - hole - 8  # BOS and tokenizer merges at the seams
    context = settings.prefix_tokens + settings.suffix_tokens
    if context <= room:
        return settings
    prefix, suffix = split_context(max(room, 2), settings.prefix_tokens, settings.suffix_tokens, least_prefix=1)
    return msgspec.structs.replace(settings, prefix_tokens=prefix, suffix_tokens=suffix)


def split_context(room: int, prefix: int, suffix: int, *, least_prefix: int = 0) -> tuple[int, int]:
    """``room`` tokens of context, shared between prefix and suffix as ``prefix`` is to ``suffix``
    (the prefix at least ``least_prefix``, neither below 0)."""
    head = max(least_prefix, room * prefix // max(1, prefix + suffix))
    return head, max(0, room - head)
