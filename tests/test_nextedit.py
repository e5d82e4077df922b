"""Next-edit prediction: what an edit was, where it implies another, and the one-canvas job."""

from __future__ import annotations

import pytest

from diffu_lsp import nextedit
from diffu_lsp.job import Request
from diffu_lsp.nextedit import Prediction, candidates, edit_between, follow, nearest_after, plain_replacements
from diffu_lsp.settings import Settings

BEFORE = '''def summarize(items, limit):
    count = 0
    for item in items:
        if item > limit:
            count += 1
    print("count:", count)  # count
    return count + items.count


def other(values):
    count = len(values)
    return count
'''


def renamed(old: str, new: str, text: str = BEFORE, first: str = "    count = 0") -> str:
    return text.replace(first, first.replace(old, new), 1)


def texts(text: str, spans) -> list[str]:
    return [text[c.start:c.end] for c in spans]


def test_the_edit_is_widened_to_whole_words():
    words = lambda before, after: (edit_between(before, after).removed, edit_between(before, after).introduced)  # noqa: E731
    assert words("count = 0", "counter = 0") == ("count", "counter")
    assert words("count = 0", "cost = 0") == ("count", "cost")
    edit = edit_between("foo(a)", "foo(a, b)")
    assert (edit.start, edit.end, edit.removed, edit.introduced) == (5, 8, "", ", b")
    assert edit_between("same", "same") is None
    assert edit_between("x", "x" + "y = 1\n" * 100) is None  # a paste implies nothing


def test_a_renamed_binding_implies_its_other_uses_in_the_function_only():
    after = renamed("count", "total")
    found = candidates(after, edit_between(BEFORE, after))
    # not the string, the comment, the attribute, nor other()'s own local of that name
    assert texts(after, found) == ["count", "count", "count"]
    assert [after.count("\n", 0, c.start) for c in found] == [4, 5, 6]
    assert all(c.guess == "total" and c.prior == 1.0 for c in found)


def test_renaming_one_use_implies_nothing_sure():
    after = BEFORE.replace("    return count +", "    return total +")
    found = candidates(after, edit_between(BEFORE, after))
    assert found and all(c.prior == 0.0 for c in found)  # count is still bound: the model decides


def test_sibling_lines_get_the_same_change_at_the_same_place():
    before = "    check(a, 1)\n    check(b, 2)\n    other(c, 3)\n    check(d, 4)\n"
    after = before.replace("check(a, 1)", "check(a, 1, strict=True)")
    found = candidates(after, edit_between(before, after))
    assert [(after[c.start - 4:c.start], c.start == c.end, c.guess) for c in found] == [
        ("b, 2", True, ", strict=True"), ("d, 4", True, ", strict=True")]


def test_candidates_are_nearest_first_and_capped():
    body = "    v = 0\n" + "    use(v)\n" * 20
    before = f"def f():\n{body}"
    after = before.replace("    v = 0", "    w = 0")
    found = candidates(after, edit_between(before, after))
    assert len(found) == nextedit.MAX_CANDIDATES
    assert [after.count("\n", 0, c.start) for c in found] == list(range(2, 2 + nextedit.MAX_CANDIDATES))


def test_plain_replacement_baseline_replaces_every_whole_word():
    after = renamed("count", "total")
    # the string, the comment, the attribute and other()'s two too
    assert len(plain_replacements(after, edit_between(BEFORE, after))) == 8


def test_predictions_follow_edits_and_are_withdrawn_when_their_text_changes():
    text = "a = x\nb = x\nc = x\n"
    preds = [Prediction(4, 5, "x", "y"), Prediction(16, 17, "x", "y")]
    moved = follow(preds, text, "# top\n" + text)
    assert [(p.start, p.end) for p in moved] == [(10, 11), (22, 23)]
    assert follow(preds, text, text.replace("c = x", "c = z")) == preds[:1]
    assert nearest_after(preds, 5) == preds[1] and nearest_after(preds, 17) == preds[0]
    assert nearest_after([], 0) is None


def test_request_spans_must_be_sorted_and_inside_the_text():
    Request("next_edit", "abc def", 0, 0, Settings(), spans=((0, 3, "x", 0.0), (4, 7, "y", 1.0)))
    with pytest.raises(ValueError):
        Request("next_edit", "abc def", 0, 0, Settings(), spans=((4, 7, "y", 1.0), (0, 3, "x", 0.0)))
    with pytest.raises(ValueError):
        Request("next_edit", "abc", 0, 0, Settings(), spans=((0, 9, "x", 0.0),))


@pytest.fixture(scope="module")
def bundled():
    from diffu_lsp.models import load_model

    return load_model(None, device="cpu", dtype="float32")


def predicted(model, before: str, after: str, **settings) -> list[tuple[str, str]]:
    from diffu_lsp import features

    spans = [(c.start, c.end, c.guess, c.prior) for c in candidates(after, edit_between(before, after))]
    request = Request("next_edit", after, 0, 0, Settings(**settings), spans=tuple(spans))
    return [(after[r.start:r.end], r.text) for r in features.answer(model, request)]


def test_the_job_renames_the_dangling_uses_in_one_canvas(bundled):
    assert predicted(bundled, BEFORE, renamed("count", "total")) == [("count", "total")] * 3


def test_the_model_alone_decides_where_the_edit_is_not_sure(bundled):
    after = BEFORE.replace("    return count +", "    return total +")
    # the bundled model is unsure of every masked use: no prediction
    assert predicted(bundled, BEFORE, after) == []
    # with no gate, whatever it fills that differs is a prediction: the canvas really was denoised
    assert predicted(bundled, BEFORE, after, next_edit_confidence=0.0)


def test_candidates_far_apart_fit_the_model_s_positions_or_are_refused_clearly(bundled, monkeypatch):
    """The text between the first and last candidate (up to 2 x WINDOW_CHARS) comes on top of the
    context budgets: the soak's next-edit jobs failed in the model with "canvas of 2119 tokens
    exceeds the model's 2048". The context is cut to make room; a span the model cannot hold at
    all is a RequestTooLarge, said before any forward."""
    from diffu_lsp.errors import RequestTooLarge

    above = "".join(f"def helper_{i}(x):\n    return x + {i}\n\n\n" for i in range(60))  # the prefix's budget, full
    between = "".join(f"    step_{i} = {i}\n" for i in range(60))  # ~400 tokens between the two uses
    before = f"{above}def summarize(items):\n    count = len(items)\n    print(count)\n{between}    return count\n"
    after = before.replace("    count = len(items)", "    total = len(items)")
    monkeypatch.setattr(bundled, "max_length", 900)
    assert predicted(bundled, before, after) == [("count", "total")] * 2
    monkeypatch.setattr(bundled, "max_length", 300)
    with pytest.raises(RequestTooLarge, match="over the model's 300 positions"):
        predicted(bundled, before, after)


def test_a_new_parameter_implies_the_call_sites():
    before = 'def area(w, h):\n    return w * h\n\n\nprint(area(1, 2))\nx = area(3, len("a)"))\ny = area()\n'
    after = before.replace("def area(w, h):", "def area(w, h, scale):")
    found = candidates(after, edit_between(before, after))
    assert [(after[:c.start + 1].rsplit("area", 1)[1], c.start == c.end, c.guess) for c in found] == [
        ("(1, 2)", True, ", scale"), ('(3, len("a)"))', True, ", scale"), ("()", True, "scale")]


def test_candidates_lie_in_the_window_around_the_edit():
    far = "\n" * (nextedit.WINDOW_CHARS + 10)
    before = f"def area(w, h):\n    return w * h\n{far}x = area(1, 2)\ny = area(3, 4)\n"
    after = before.replace("def area(w, h):", "def area(w, h, scale):")
    assert candidates(after, edit_between(before, after)) == []
    near = after.replace(far, "\n")
    assert len(candidates(near, edit_between(before.replace(far, "\n"), near))) == 2


def test_the_changed_region_is_found_in_a_big_file_too():
    body = "x = 1\n" * 5000
    before = body + "count = 0\n" + body
    edit = edit_between(before, body + "total = 0\n" + body)
    assert (edit.start, edit.end, edit.removed, edit.introduced) == (len(body), len(body) + 5, "count", "total")
    assert edit_between("(" * 9000, "(" * 9000 + ")").start == 9000  # at the very end



def test_a_keystroke_with_nothing_to_follow_compares_nothing(monkeypatch):
    """didChange runs the tracker on every keystroke, nextEdit on or off: with no prediction and
    no rejection to move, the document's text is kept and no diff of the two texts is made (it
    was ~1 ms a keystroke in a 270 kB file). Predictions still follow once there are some."""
    compared = []
    real = nextedit._common_ends
    monkeypatch.setattr(nextedit, "_common_ends", lambda a, b: compared.append(1) or real(a, b))
    body = "x = 1\n" * 5000
    tracker = nextedit.Tracker()
    tracker.opened("file:///a.py", body)
    for n in range(1, 4):
        assert tracker.changed("file:///a.py", body + "y" * n) is False
    assert compared == [] and tracker.documents["file:///a.py"].text == body + "yyy"
    tracker.documents["file:///a.py"].predictions = [Prediction(0, 1, "x", "z")]
    assert tracker.changed("file:///a.py", body + "yyyy") is False and compared
    assert tracker.documents["file:///a.py"].predictions == [Prediction(0, 1, "x", "z")]

class SlowNextEditEngine:
    """Answers suggestions at once; a next-edit job runs (checking its token before each
    "forward", as the sampler does) until cancelled, or returns a rename of every span."""

    name = "slow-next-edit"

    def __init__(self):
        import threading

        self.started, self.release, self.requests = threading.Event(), threading.Event(), []

    def load(self, key):
        from diffu_lsp.job import ModelInfo

        return ModelInfo(key.label, "test", "cpu", 4096, 1, 0.0)

    def run(self, request, cancel, on_step=None, on_oom_retry=None, *, key=""):
        from diffu_lsp.job import Replacement, Suggestion

        self.requests.append(request.kind)
        if request.kind != "next_edit":
            return Suggestion("x", 0, False, 1, 1, 0.0)
        self.started.set()
        while not self.release.wait(0.01):
            if cancel.cancelled:
                return []
            cancel.forwards += 1
        return [Replacement(start, end, guess) for start, end, guess, _ in request.spans]

    def configure(self, settings):
        pass

    def describe(self):
        return {"engine": self.name}

    def close(self):
        pass


def test_a_suggestion_preempts_a_running_prediction_which_keeps_its_edit_for_later():
    import asyncio

    from diffu_lsp.errors import JobCancelled
    from diffu_lsp.session import PREEMPTED, Session

    engine = SlowNextEditEngine()
    session = Session(engine, make_engine=lambda choice: engine)
    key, generation = session.load_needed()
    assert session.loaded(engine.load(key), generation)
    after = renamed("count", "total")
    session.next_edits.opened("file:///a.py", BEFORE)
    session.next_edits.changed("file:///a.py", after)

    async def go():
        prediction = asyncio.ensure_future(session.predict_next_edits("file:///a.py", after, 2))
        while not engine.started.is_set():
            await asyncio.sleep(0.01)
        shown = await asyncio.wait_for(session.suggest("file:///b.py", "x = ", 4, 1, debounce=False), 10)  # elsewhere
        with pytest.raises(JobCancelled, match=PREEMPTED):
            await prediction
        assert shown == [("x", 0)]
        assert session.next_edits.documents["file:///a.py"].settled == BEFORE  # the edit is still to predict
        engine.release.set()
        again = await session.predict_next_edits("file:///a.py", after, 2)
        await session.close()
        return again

    again = asyncio.run(go())
    assert [(p.old, p.text) for p in again] == [("count", "total")] * 3
    assert engine.requests == ["next_edit", "suggest", "next_edit"]


def test_the_last_edit_is_offered_again_only_for_the_text_it_was_found_in():
    tracker = nextedit.Tracker()
    tracker.opened("u", BEFORE)
    after = renamed("count", "total")
    tracker.changed("u", after)
    edit = tracker.settle("u", after)
    assert tracker.settle("u", after) is None and tracker.last_edit("u", after) == edit
    moved = "# top\n" + after
    tracker.changed("u", moved)
    assert tracker.last_edit("u", moved) is None  # its offsets are into the text before


def test_a_model_that_edits_may_change_only_the_candidates_lines(random_dream):
    from diffu_lsp import features
    from diffu_lsp.models import load_model

    model = load_model(str(random_dream), device="cpu", dtype="float32")
    after = BEFORE.replace("    return count +", "    return total +")
    found = candidates(after, edit_between(BEFORE, after))
    spans = tuple((c.start, c.end, c.guess, c.prior) for c in found)
    lines = {after.count("\n", 0, c.start) for c in found}

    def run(**settings):
        request = Request("next_edit", after, 0, 0, Settings(algorithm="entropy", next_edit_confidence=0.0, **settings),
                          spans=spans)
        return features.answer(model, request)

    masked_only = run()
    assert {(r.start, r.end) for r in masked_only} <= {(c.start, c.end) for c in found}
    editing = run(edit_threshold=1e-6)  # a random network that "edits": it changes what it may
    extra = [r for r in editing if (r.start, r.end) not in {(c.start, c.end) for c in found}]
    assert extra, editing
    assert all(after.count("\n", 0, r.start) in lines and "\n" not in after[r.start:r.end] for r in extra)
