"""Warm start alignment (diffu_lsp/warm_start.py): exact expectations on a toy vocabulary."""

import pytest

from diffu_lsp.warm_start import Canvas, CanvasStore, align, canvas_of, draft_text

MASK, EOS = 0, 1
VOCAB = {2: "return", 3: " x", 4: " +", 5: " 1", 6: "\n", 7: " y", 8: "re"}
M = MASK


def piece(token: int) -> str:
    return VOCAB[token]


DOC = "def f(x):\n    " + "" + "\nprint(f(2))\n"
CURSOR = DOC.index("\nprint")


def previous(ids, text=DOC, cursor=CURSOR):
    return canvas_of(text, cursor, cursor, ids)


def typed(chars: str, text=DOC, cursor=CURSOR):
    return text[:cursor] + chars + text[cursor:], cursor + len(chars)


def run(ids, chars, length=6, **kw):
    text, cursor = typed(chars)
    return align(previous(ids), text, cursor, cursor, length, mask_id=MASK, piece=piece, stop_ids=(EOS,), **kw)


def test_nothing_typed_keeps_every_token_provisional_and_masks_as_masks():
    got = run([2, 3, M, 5, EOS, EOS], "")
    assert got.ids == [2, 3, M, 5, EOS, EOS]
    assert got.provisional == [True, True, False, True, True, True]
    assert (got.consumed, got.remasked) == (0, 0)


def test_typing_that_agrees_consumes_whole_tokens_and_pads_the_hole_with_masks():
    got = run([2, 3, 4, 5, 6, EOS], "return x")
    assert got.ids == [4, 5, 6, EOS, M, M]
    assert got.provisional == [True, True, True, True, False, False]
    assert (got.consumed, got.remasked) == (2, 0)


def test_a_divergent_character_remasks_the_conflict_and_a_window_after_it_only():
    got = run([2, 3, 4, 5, 6, 7, EOS, EOS], "return y", length=8, window=2)
    # "return" agrees; " y" meets " x": " x", " +", " 1" are re-masked, the rest stays provisional
    assert got.ids == [M, M, M, 6, 7, EOS, EOS, M]
    assert got.provisional == [False, False, False, True, True, True, True, False]
    assert (got.consumed, got.remasked) == (1, 3)


def test_a_token_covered_only_in_part_is_a_conflict():
    got = run([2, 3, 4, 5], "ret", length=4, window=1)
    assert got.ids == [M, M, 4, 5]
    assert (got.consumed, got.remasked) == (0, 2)


def test_typing_into_a_mask_or_past_an_eos_is_a_conflict():
    assert run([2, M, 4, 5], "return x", length=4, window=1).ids == [M, M, 5, M]
    assert run([2, EOS, EOS, EOS], "return(", length=4, window=0).ids == [M, EOS, EOS, M]


def test_the_draft_is_cut_to_a_shorter_hole():
    assert run([2, 3, 4, 5, 6, 7], "", length=3).ids == [2, 3, 4]


def test_no_draft_when_the_place_or_the_text_around_it_changed():
    assert run([2, 3], "return x + 1\n") is None  # typed past the whole draft
    text, cursor = typed("return")
    other_after = text[:cursor] + "\nprint(g(2))\n"
    assert align(previous([2, 3, 4]), other_after, cursor, cursor, 4, mask_id=MASK, piece=piece) is None
    other_before = "def g" + text[5:]
    assert align(previous([2, 3, 4]), other_before, cursor, cursor, 4, mask_id=MASK, piece=piece) is None
    assert align(previous([2, 3, 4]), DOC, CURSOR - 1, CURSOR - 1, 4, mask_id=MASK, piece=piece) is None
    assert run([M, M, M], "") is None  # all masks: nothing to start from


def test_healed_blanks_are_part_of_what_is_consumed():
    # the old hole began before the indentation's last blank ("    |" healed to "   " + " return")
    text = "if a:\n    \nb\n"
    start, cursor = text.index("\nb") - 1, text.index("\nb")
    vocab_piece = {2: " return", 3: " x"}.get
    canvas = canvas_of(text, start, cursor, [2, 3])
    assert canvas == Canvas((2, 3), start, cursor, text[:start], text[cursor:])
    new = text[:cursor] + "return" + text[cursor:]
    got = align(canvas, new, cursor + 6, cursor + 6, 3, mask_id=MASK, piece=vocab_piece)
    assert got.ids == [3, M, M] and got.consumed == 1


def test_store_keeps_the_last_canvas_per_key_and_forgets_the_oldest():
    drafts = CanvasStore(limit=2)
    for key in "abc":
        drafts.put(key, previous([2]))
    drafts.put("b", previous([3]))
    assert drafts.get("a") is None and drafts.get("b").ids == (3,) and drafts.get("c").ids == (2,)


def test_draft_text_shows_each_run_of_masks_once_and_ends_at_eos():
    def text(ids):
        return draft_text(ids, mask_id=MASK, decode=lambda run: "".join(VOCAB[t] for t in run), stop_ids=(EOS,))

    assert text([M, M, M]) == "…"
    assert text([2, 3, M, M, 5, M]) == "return x… 1…"
    assert text([M, 3, 4, 5, 6]) == "… x + 1\n"
    assert text([2, 3, EOS, M, 7]) == "return x"  # after EOS is pad, masked or not
    assert text([]) == ""


# ---------------------------------------------------------------- through the job path, bundled model

def test_a_window_engine_starts_the_next_suggestion_from_the_last_canvas():
    from diffu_lsp.engine import LocalEngine
    from diffu_lsp.errors import JobCancelled
    from diffu_lsp.job import ModelKey, Request
    from diffu_lsp.settings import Settings

    engine = LocalEngine()
    engine.load(ModelKey(None))
    model = engine.model
    text = "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n        lines\n\n\ndef main():\n    pass\n"
    cursor = text.index("\n\n\ndef main")  # after "lines": no blanks to heal, the hole starts at the cursor
    settings = Settings(warm_start=True, early_exit=False)
    first = engine.run(Request("suggest", text, cursor, cursor, settings), None, key="a.py")
    assert first.drafted == 0
    kept = engine.held.drafts.get("a.py")
    assert kept is not None and kept.cursor == cursor and model.mask_token_id not in kept.ids
    # type the hole's first tokens past the blanks it began with: the next job starts from the rest of it
    pieces = [model.decode([t]) for t in kept.ids]
    assert kept.start == cursor
    k = next(k for k in range(1, len(pieces)) if pieces[k - 1].strip() and not pieces[k - 1].endswith((" ", "\t")))
    typed = "".join(pieces[:k])
    new_text, new_cursor = text[:cursor] + typed + text[cursor:], cursor + len(typed)
    second = engine.run(Request("suggest", new_text, new_cursor, new_cursor, settings), None, key="a.py")
    assert second.drafted == sum(1 for t in kept.ids[k:k + second.hole_tokens] if t != model.mask_token_id) > 0
    assert engine.held.drafts.get("a.py").start == new_cursor
    # warm start off: the same request decodes cold; another document has no draft
    cold = engine.run(Request("suggest", new_text, new_cursor, new_cursor, Settings(early_exit=False)), None, key="a.py")
    assert cold.drafted == 0
    assert engine.run(Request("suggest", new_text, new_cursor, new_cursor, settings), None, key="b.py").drafted == 0

    # a job cancelled mid-way leaves its partial canvas (masks where it had not decoded yet)
    class Flag:
        cancelled = False

    flag = Flag()

    def stop(step) -> None:
        flag.cancelled = True

    engine.held.drafts.clear()
    with pytest.raises(JobCancelled):
        engine.run(Request("suggest", text, cursor, cursor, Settings(warm_start=True, algorithm="entropy", steps=16)),
                   flag, on_step=stop, key="a.py")
    partial = engine.held.drafts.get("a.py").ids
    assert model.mask_token_id in partial and any(t != model.mask_token_id for t in partial)


def test_every_kind_of_job_streams_its_draft_until_it_is_the_answer():
    """on_step sees each step's draft: masks shown as "…" while any are left in the text so far,
    and at the last step the hole's text itself (refine), one draft per hole (fill holes)."""
    from diffu_lsp import features
    from diffu_lsp.engine import LocalEngine
    from diffu_lsp.job import ModelKey, Request
    from diffu_lsp.settings import Settings

    engine = LocalEngine()
    engine.load(ModelKey(None))
    settings = Settings(algorithm="entropy", steps=8, early_exit=False)  # 8 steps: the draft firms up in view
    text = "def add(a, b):\n    total = a + b\n    return total\n\n\ndef sub(a, b):\n    ...\n    return a\n"
    start, end = text.index("total = a"), text.index("\n    return total")

    holes = text.replace("total = a + b", "...")  # and sub's "...": two holes
    for request in (Request("refine", text, start, end, settings), Request("suggest", text, end, end, settings),
                    Request("block", text, end, end, settings), Request("fill_holes", holes, 0, len(holes), settings)):
        kind, steps = request.kind, []
        answer = engine.run(request, None, on_step=steps.append, key="a.py")
        assert len(steps) == 8 and [st.step for st in steps] == list(range(1, 9)), kind
        assert steps[-1].masked == 0 and "…" not in steps[-1].text, kind
        assert all(st.masked > 0 for st in steps[:-1]), kind
        assert "…" in steps[0].text, kind  # the first step revealed an eighth of the hole
        if kind == "refine":
            assert steps[-1].text == answer
        if kind == "fill_holes":
            assert all(st.text.count(features.BETWEEN_HOLES) == 1 for st in steps)  # two holes, two drafts


def test_refine_low_confidence_keeps_the_tokens_it_trusts_as_a_provisional_draft(monkeypatch):
    """refineMode low_confidence is the warm-start mechanism on the selection: the tokens the model
    doubts (scored while masked) are masked, the rest go in as provisional tokens to be re-checked."""
    import statistics

    from diffu_lsp import features, infill
    from diffu_lsp.models import load_model
    from diffu_lsp.settings import Settings

    model = load_model(None)
    monkeypatch.setattr(model, "default_sampling", {k: v for k, v in model.default_sampling.items()
                                                    if k != "edit_threshold"})  # as for a masked-only model
    text = "def add(a, b):\n    total = a + b\n    return total\n\n\ndef main():\n    print(add(1, 2))\n"
    start, end = text.index("total = a"), text.index("\n    return total")
    prefix, selected, suffix = infill.refine_request(text, start, end, model.encode, 768, 256)
    healed = prefix[len(prefix.rstrip(" ")):]  # the indentation goes with the selection (token healing)
    prefix_ids, selected_ids, suffix_ids = (model.encode(prefix[:-len(healed)]), model.encode(healed + selected),
                                            model.encode(suffix))
    scores = model.token_probabilities(prefix_ids, selected_ids, suffix_ids)
    fills = []
    real_fill = model.fill

    def spy(canvas, *args, **kwargs):
        result = real_fill(canvas, *args, **kwargs)
        fills.append((list(canvas), kwargs.get("provisional"), result))
        return result

    monkeypatch.setattr(model, "fill", spy)
    trusting = Settings(refine_mode="low_confidence", refine_confidence=0.0)
    assert features.refine(model, text, start, end, trusting) == selected and not fills  # nothing doubted
    doubting = Settings(refine_mode="low_confidence", refine_confidence=statistics.median(scores))
    features.refine(model, text, start, end, doubting)
    ((canvas, provisional, result),) = fills
    at = slice(len(prefix_ids), len(prefix_ids) + len(selected_ids))
    kept = [token != model.mask_token_id for token in canvas[at]]
    assert kept == [score >= doubting.refine_confidence for score in scores] and any(kept) and not all(kept)
    assert provisional[at] == kept and not any(provisional[:at.start]) and not any(provisional[at.stop:])
    assert result.drafted == sum(kept)  # the sampler took them as drafts to re-check
    fills.clear()
    features.refine(model, text, start, end, Settings(refine_mode="all"))
    assert fills[0][1] is None  # regenerating all of it has no draft


def test_refine_low_confidence_with_token_editing_hands_the_whole_selection_to_the_sampler(monkeypatch):
    """With an edit threshold the model judges the selection as it stands: nothing is scored while
    masked or masked, every selected token goes in as a draft the sampler may edit (T2T), and the
    text outside the selection is never a draft."""
    from diffu_lsp import features, infill
    from diffu_lsp.models import load_model
    from diffu_lsp.settings import Settings

    model = load_model(None)
    text = "def add(a, b):\n    total = a + b\n    return total\n\n\ndef main():\n    print(add(1, 2))\n"
    start, end = text.index("total = a"), text.index("\n    return total")
    prefix, selected, suffix = infill.refine_request(text, start, end, model.encode, 768, 256)
    prefix_ids, selected_ids = model.encode(prefix.rstrip(" ")), model.encode("    " + selected)
    fills, real_fill = [], model.fill

    def spy(canvas, *args, **kwargs):
        result = real_fill(canvas, *args, **kwargs)
        fills.append((list(canvas), kwargs.get("provisional"), args[0], result))
        return result

    monkeypatch.setattr(model, "fill", spy)
    monkeypatch.setattr(model, "token_probabilities", lambda *a: pytest.fail("scored while masked"))
    features.refine(model, text, start, end, Settings(refine_mode="low_confidence", edit_threshold=0.5))
    ((canvas, provisional, sampling, result),) = fills
    at = slice(len(prefix_ids), len(prefix_ids) + len(selected_ids))
    assert canvas[at] == selected_ids and model.mask_token_id not in canvas
    assert all(provisional[at]) and not any(provisional[:at.start]) and not any(provisional[at.stop:])
    assert sampling.edit_threshold == 0.5 and result.drafted == len(selected_ids)


def test_refine_of_a_line_s_code_gives_the_model_the_tokens_of_training_not_a_split_indentation(monkeypatch):
    """A selection that starts after indentation (the line's code) is tokenized with its last blanks,
    as every training example was ("   " + " total"): the canvas never has an indentation token
    followed by a word without its space, a pair the model never saw. The result is the selection's
    text again, without the blanks."""
    from diffu_lsp import features
    from diffu_lsp.models import load_model
    from diffu_lsp.settings import Settings

    model = load_model(None)
    text = "def add(a, b):\n    total = a + b\n    return total\n"
    start, end = text.index("total = a"), text.index("\n    return total")
    fills, real_fill = [], model.fill

    def spy(canvas, *args, **kwargs):
        fills.append(list(canvas))
        return real_fill(canvas, *args, **kwargs)

    monkeypatch.setattr(model, "fill", spy)
    refined = features.refine(model, text, start, end, Settings(refine_mode="low_confidence", edit_threshold=0.99))
    natural = model.encode(text[:end])  # the document up to the selection's end, tokenized whole
    assert fills[0][:len(natural)] == natural
    assert not refined.startswith(" ")  # the blanks stay where they were: the edit covers the selection only
