"""The sampler against hand-built logits (exact schedule checks) and the bundled model."""

from __future__ import annotations

import pytest
import torch

from diffu_lsp.models import load_model
from diffu_lsp.errors import JobCancelled
from diffu_lsp.models.backend import CachedForward
from diffu_lsp.sampler import Sampling, above_threshold, by_factor, choose_tokens, denoise, dream_reveal_count

MASK = 9
VOCAB = 10


class FixedLogits:
    """Logits that do not depend on the canvas: position i prefers token `best[i]` with
    confidence `strength[i]`; records how many positions were masked at each forward."""

    def __init__(self, best, strength):
        self.best, self.strength = best, strength
        self.masked_per_forward = []

    def __call__(self, canvas, positions):
        self.masked_per_forward.append(int((canvas == MASK).sum()))
        logits = torch.zeros(canvas.shape[0], VOCAB)
        for i, (token, strength) in enumerate(zip(self.best, self.strength)):
            logits[i, token] = strength
        return logits[positions]


def test_dream_schedule_reveal_counts_match_the_formula():
    steps, n = 5, 12
    timesteps = torch.linspace(1, 1e-3, steps + 1)
    expected, left = [], n
    for i in range(steps):
        count = left if i == steps - 1 else int(left * (1 - timesteps[i + 1] / timesteps[i]))
        expected.append(count)
        left -= count
    assert [dream_reveal_count(x, i, steps) for i, x in enumerate([12, 12 - expected[0], 12 - sum(expected[:2]),
                                                                     12 - sum(expected[:3]), 12 - sum(expected[:4])])] == expected
    assert sum(expected) == n


def test_dream_schedule_reveals_most_confident_first():
    best = [1, 2, 3, 4, 5, 6, 7, 8]
    strength = [1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0]
    logits = FixedLogits(best, strength)
    canvas = torch.full((8,), MASK)
    revealed_order = []

    def on_step(draft):
        revealed_order.append(sorted(i for i in range(8) if draft.canvas[i] != MASK))

    result = denoise(logits, canvas, MASK, Sampling(alg="maskgit_plus", steps=4), on_step=on_step)
    assert result.canvas.tolist() == best
    # the first step's reveals are exactly the most confident positions
    first = revealed_order[0]
    ranked = sorted(range(8), key=lambda i: -strength[i])
    assert first == sorted(ranked[:len(first)])
    assert result.reveal_step.tolist() == [result.reveal_step[i].item() for i in range(8)]
    assert result.forwards == len(revealed_order) <= 4


def test_steps_that_reveal_nothing_skip_their_forward():
    logits = FixedLogits([1, 2], [5.0, 4.0])
    result = denoise(logits, torch.full((2,), MASK), MASK, Sampling(alg="entropy", steps=64))
    assert result.canvas.tolist() == [1, 2]
    assert result.forwards == len(logits.masked_per_forward) <= 2


def test_threshold_reveals_all_confident_positions_at_once():
    # two positions are near-certain, one is not: first forward reveals the two
    logits = FixedLogits([1, 2, 3], [20.0, 20.0, 0.5])
    result = denoise(logits, torch.full((3,), MASK), MASK, Sampling(alg="threshold", threshold=0.9))
    assert result.canvas.tolist() == [1, 2, 3]
    assert logits.masked_per_forward == [3, 1]
    assert result.confidence[0] > 0.99 and result.confidence[2] < 0.9


def test_threshold_reveals_at_least_one_per_forward():
    logits = FixedLogits([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4])
    result = denoise(logits, torch.full((4,), MASK), MASK, Sampling(alg="threshold", threshold=0.99))
    assert result.forwards == 4
    assert logits.masked_per_forward == [4, 3, 2, 1]
    assert result.reveal_step.tolist() == [4, 3, 2, 1]  # most confident first


def test_threshold_selection_by_hand():
    assert sorted(above_threshold(torch.tensor([0.95, 0.5, 0.92]), 0.9).tolist()) == [0, 2]
    assert above_threshold(torch.tensor([0.1, 0.4, 0.3]), 0.9).tolist() == [1]  # none passes: the best one


def test_factor_rule_selection_by_hand():
    confidence = torch.tensor([0.5, 0.9, 0.7, 0.95])  # sorted: 0.95, 0.9, 0.7, 0.5
    # f=1: bars 1-1/2=0.5, 1-1/3=0.667, 1-1/4=0.75, 1-1/5=0.8 -> 0.95, 0.9 pass; 0.7 < 0.75 stops
    assert by_factor(confidence, 1.0).tolist() == [3, 1]
    # f=2: bars 0, 0.333, 0.5, 0.6 -> three pass; 0.5 < 0.6
    assert by_factor(confidence, 2.0).tolist() == [3, 1, 2]
    # f=4: bars -1, -0.333, 0, 0.2 -> all four
    assert sorted(by_factor(confidence, 4.0).tolist()) == [0, 1, 2, 3]
    # f=0.1: the first bar is 0.95 -> exactly the top one
    assert by_factor(confidence, 0.1).tolist() == [3]
    # nothing passes: still the single most confident
    assert by_factor(torch.tensor([0.3, 0.6, 0.2]), 0.5).tolist() == [1]


def test_factor_rule_in_the_loop_reveals_by_count():
    # p(best) over the 9 non-mask tokens: strength 20 -> ~1.0, 3 -> e^3/(e^3+8) = 0.715, 1 -> e/(e+8) = 0.254
    logits = FixedLogits([1, 2, 3, 4], [20.0, 20.0, 3.0, 1.0])
    result = denoise(logits, torch.full((4,), MASK), MASK, Sampling(alg="factor", factor=1.0))
    # forward 1: 1.0, 1.0 pass (bars 0.5, 0.667), 0.715 < 0.75; forward 2: 0.715 >= 0.5, 0.254 < 0.667
    assert logits.masked_per_forward == [4, 2, 1]
    assert result.canvas.tolist() == [1, 2, 3, 4]
    assert result.reveal_step.tolist() == [1, 1, 2, 3]


def test_blocks_finish_in_order():
    logits = FixedLogits([1, 2, 3, 4], [0.1, 0.2, 9.0, 9.5])
    result = denoise(logits, torch.full((4,), MASK), MASK, Sampling(alg="threshold", threshold=0.99, block_length=2))
    steps = result.reveal_step.tolist()
    assert max(steps[:2]) < min(steps[2:])  # block 2 waited for block 1 though it was more confident


def test_mask_token_is_never_revealed():
    logits = FixedLogits([MASK, MASK], [50.0, 50.0])
    result = denoise(logits, torch.full((2,), MASK), MASK, Sampling())
    assert MASK not in result.canvas.tolist()


def test_top_k_and_top_p_restrict_choices():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    torch.manual_seed(0)
    picks = {int(choose_tokens(logits, Sampling(temperature=1.0, top_k=2))[0]) for _ in range(50)}
    assert picks <= {0, 1} and len(picks) == 2
    picks = {int(choose_tokens(logits, Sampling(temperature=1.0, top_p=0.3))[0]) for _ in range(20)}
    assert picks == {0}


def test_sampling_rejects_bad_values():
    for bad in (dict(alg="nope"), dict(threshold=0), dict(steps=0), dict(temperature=-1), dict(top_p=1.5),
                dict(factor=0), dict(factor=-1.0)):
        with pytest.raises(ValueError):
            Sampling(**bad)


class CountingCancel:
    def __init__(self, cancel_after):
        self.forwards, self.cancel_after = 0, cancel_after

    @property
    def cancelled(self):
        return self.forwards >= self.cancel_after


def test_cancel_is_honoured_before_the_next_forward():
    logits = FixedLogits(list(range(8)), [0.1] * 8)
    token = CountingCancel(cancel_after=3)
    result = denoise(logits, torch.full((8,), MASK), MASK, Sampling(alg="threshold", threshold=0.99), cancel=token)
    assert result.cancelled and result.forwards == 3 == token.forwards
    assert int((result.canvas == MASK).sum()) == 5


def test_on_step_can_stop_early_with_a_complete_block():
    logits = FixedLogits([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4])
    result = denoise(logits, torch.full((4,), MASK), MASK, Sampling(threshold=0.99), on_step=lambda d: d.step >= 2)
    assert result.stopped_early and result.forwards == 2
    assert result.canvas.tolist() == [1, 2, 3, 4]


# ---------------------------------------------------------------- on the bundled model

@pytest.fixture(scope="module")
def bundled():
    return load_model()


PREFIX = "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n        "
SUFFIX = "\n\n\ndef main():\n    print(read_lines('x'))\n"


def test_threshold_uses_fewer_forwards_than_one_token_per_step(bundled):
    canvas = bundled.encode(PREFIX) + [bundled.mask_token_id] * 32 + bundled.encode(SUFFIX)
    one_per_step = bundled.fill(canvas, Sampling(alg="entropy", steps=32))
    threshold = bundled.fill(canvas, Sampling(alg="threshold", threshold=0.9))
    assert one_per_step.forwards >= 31  # Dream: step 0 reveals int(32 * 0.0312) = 0 and is skipped
    assert threshold.forwards < one_per_step.forwards


def test_greedy_is_deterministic_on_the_bundled_model(bundled):
    first = bundled.infill(PREFIX, SUFFIX, 24, alg="entropy", steps=12)
    assert first == bundled.infill(PREFIX, SUFFIX, 24, alg="entropy", steps=12)


def test_cancel_stops_before_the_next_forward_on_the_bundled_model(bundled):
    class Flag:
        cancelled = False
        forwards = 0

    flag = Flag()

    def on_step(draft):
        if draft.step == 2:
            flag.cancelled = True  # as the scheduler does from the event loop thread

    canvas = bundled.encode(PREFIX) + [bundled.mask_token_id] * 64 + bundled.encode(SUFFIX)
    result = bundled.fill(canvas, Sampling(alg="entropy", steps=64), cancel=flag, on_step=on_step)
    assert result.cancelled and result.forwards == 2 == flag.forwards
    with pytest.raises(JobCancelled):
        bundled.infill_ids(bundled.encode(PREFIX), [], 8, cancel=flag)


def test_the_step_callback_sees_the_caller_s_canvas_when_a_bos_is_put_in_front(bundled):
    """A shifted model scores position 0 from a BOS the backend puts in front of a canvas that
    starts masked; the callback (a command's streamed draft) must not see that extra position."""
    canvas = [bundled.mask_token_id] * 8 + bundled.encode(SUFFIX)
    seen = []
    result = bundled.fill(canvas, Sampling(alg="entropy", steps=4),
                          on_step=lambda draft: seen.append(draft.canvas.clone()))
    assert len(seen) == 4 and all(len(step) == len(canvas) for step in seen)
    assert torch.equal(seen[-1], result.canvas)


def test_early_exit_pads_the_rest_of_a_hole_after_a_stop_token():
    stop = 0
    # hole of 4: slot 1 resolves to the stop token first; slots 2 and 3 need no forward of their own
    logits = FixedLogits([5, stop, 6, 7], [0.5, 30.0, 0.1, 0.1])
    canvas = torch.full((4,), MASK)
    plain = denoise(logits, canvas, MASK, Sampling(threshold=0.99), stop_ids=(stop,))
    early = denoise(logits, canvas, MASK, Sampling(threshold=0.99, early_exit=True), stop_ids=(stop,))
    assert plain.canvas.tolist() == [5, stop, 6, 7] and plain.forwards == 4
    assert early.canvas.tolist() == [5, stop, stop, stop] and early.forwards == 2


@pytest.mark.parametrize("cache", ["prefix", "dual", "delayed"])
def test_cache_refreshed_every_step_gives_exactly_the_uncached_tokens(bundled, cache):
    canvas = bundled.encode(PREFIX) + [bundled.mask_token_id] * 24 + bundled.encode(SUFFIX)
    for sampling in (Sampling(alg="entropy", steps=12), Sampling(threshold=0.8, block_length=8)):
        uncached = bundled.fill(canvas, sampling)
        cached = bundled.fill(canvas, sampling, cache=cache, refresh_every=1)
        assert cached.canvas.tolist() == uncached.canvas.tolist()
        assert cached.refreshes == cached.forwards


def test_cache_without_refresh_reuses_context_per_block(bundled):
    canvas = bundled.encode(PREFIX) + [bundled.mask_token_id] * 32 + bundled.encode(SUFFIX)
    result = bundled.fill(canvas, Sampling(alg="entropy", steps=16, block_length=16), cache="dual")
    assert result.refreshes == 2  # once per block
    assert bundled.mask_token_id not in result.canvas.tolist()


def test_factor_rule_on_the_bundled_model(bundled):
    canvas = bundled.encode(PREFIX) + [bundled.mask_token_id] * 32 + bundled.encode(SUFFIX)
    # f -> 0: the first bar 1 - f/2 is above any confidence, so exactly one token per forward
    one_at_a_time = bundled.fill(canvas, Sampling(alg="factor", factor=1e-6))
    start = len(bundled.encode(PREFIX))
    assert one_at_a_time.forwards == 32
    assert sorted(one_at_a_time.reveal_step[start:start + 32].tolist()) == list(range(1, 33))
    # huge f: every bar is below zero, the whole hole in one forward
    at_once = bundled.fill(canvas, Sampling(alg="factor", factor=1000.0))
    assert at_once.forwards == 1
    middle = [bundled.fill(canvas, Sampling(alg="factor", factor=f)).forwards for f in (0.5, 2.0, 8.0)]
    assert 32 >= middle[0] >= middle[1] >= middle[2] >= 1
    for result in (one_at_a_time, at_once):
        assert bundled.mask_token_id not in result.canvas.tolist()
    assert bundled.infill(PREFIX, SUFFIX, 24, alg="factor", factor=2.0) == bundled.infill(PREFIX, SUFFIX, 24, alg="factor", factor=2.0)


def test_cached_step_runs_the_span_and_the_full_forward_is_a_step(bundled):
    canvas = torch.tensor(bundled.encode(PREFIX) + [bundled.mask_token_id] * 16 + bundled.encode(SUFFIX))
    holes = (canvas == bundled.mask_token_id).nonzero().squeeze(-1)
    forward = CachedForward(bundled, "dual", refresh_every=None)
    first = forward(canvas, holes)  # a full forward: it scores the step and fills the buffer
    assert forward.refreshes == 1 and forward.span == (int(holes[0]) - 1, int(holes[-1]) + 1)  # Dream: shifted rows
    assert torch.allclose(first, bundled.position_logits(canvas, holes), atol=1e-4)
    keys_before = [keys.clone() for keys, _ in forward.kv.layers]
    canvas[holes[:4]] = first[:4].argmax(-1)  # reveal four
    second = forward(canvas, holes[4:])
    assert forward.refreshes == 1 and second.shape == (12, first.shape[1])
    start, end = forward.span
    for layer, (keys, _) in enumerate(forward.kv.layers):
        assert torch.equal(keys[:, :, :start], keys_before[layer][:, :, :start])  # context kept
        assert torch.equal(keys[:, :, end:], keys_before[layer][:, :, end:])
        assert not torch.equal(keys[:, :, start:end], keys_before[layer][:, :, start:end])  # span rewritten
    # the next block's positions lie outside the span: a new full forward
    forward(canvas, torch.tensor([len(canvas) - 1]))
    assert forward.refreshes == 2


def test_delayed_cache_runs_masked_rows_and_those_revealed_since_the_last_forward(bundled):
    canvas = torch.tensor(bundled.encode(PREFIX) + [bundled.mask_token_id] * 16 + bundled.encode(SUFFIX))
    holes = (canvas == bundled.mask_token_id).nonzero().squeeze(-1)
    forward = CachedForward(bundled, "delayed", refresh_every=None)
    first = forward(canvas, holes)
    assert forward.refreshes == 1 and forward.rows == len(canvas)
    revealed = holes[[0, 5, 9]]  # three positions, not at the span's start only
    canvas[revealed] = first[[0, 5, 9]].argmax(-1)
    masked = holes[~torch.isin(holes, revealed)]
    keys_before = [keys.clone() for keys, _ in forward.kv.layers]
    second = forward(canvas, masked)
    # Dream: row p-1 scores position p; the masked positions themselves and the revealed ones rerun
    run = sorted(set((masked - 1).tolist()) | set(masked.tolist()) | set(revealed.tolist()))
    assert forward.refreshes == 1 and forward.rows == len(canvas) + len(run)
    assert second.shape == (len(masked), first.shape[1])
    kept = sorted(set(range(len(canvas))) - set(run))
    for layer, (keys, _) in enumerate(forward.kv.layers):
        assert torch.equal(keys[:, :, kept], keys_before[layer][:, :, kept])
        assert not torch.equal(keys[:, :, run], keys_before[layer][:, :, run])
    # the next step reruns only the masked positions and their scoring rows: nothing was revealed since
    forward(canvas, masked)
    assert forward.rows == len(canvas) + len(run) + len(set((masked - 1).tolist()) | set(masked.tolist()))


def test_reuse_prefix_starts_from_the_previous_jobs_keys(bundled):
    from diffu_lsp.models.backend import REUSE_LIMIT

    sampling = Sampling(alg="factor", factor=3.0, early_exit=True)
    prefix, suffix = bundled.encode(PREFIX), bundled.encode(SUFFIX)
    bundled.last_keys = None
    first = bundled.fill(prefix + [bundled.mask_token_id] * 16 + suffix, sampling, cache="dual", reuse_prefix=True)
    assert first.refreshes == 1 and first.reused == 0
    kept = bundled.last_keys
    # the user typed: the prefix gains a token, the suffix is the same (at shifted positions)
    typed = prefix + bundled.encode("x") + [bundled.mask_token_id] * 16 + suffix
    second = bundled.fill(typed, sampling, cache="dual", reuse_prefix=True)
    assert second.refreshes == 0 and 0 < second.reused <= len(prefix)
    assert bundled.mask_token_id not in second.canvas.tolist()
    for (old_keys, _), (new_keys, _) in zip(kept.kv.layers, bundled.last_keys.kv.layers):
        assert torch.equal(new_keys[:, :, :second.reused], old_keys[:, :, :second.reused])  # reused, not recomputed
    # without the flag, or with nothing shared, a full forward as before
    kept = bundled.last_keys
    assert bundled.fill(typed, sampling, cache="dual").reused == 0
    assert bundled.last_keys is kept  # a job without the flag keeps nothing
    other = bundled.encode("class A:\n    pass\n") * 3 + [bundled.mask_token_id] * 8
    unrelated = bundled.fill(other, sampling, cache="dual", reuse_prefix=True)
    assert unrelated.reused == 0 and unrelated.refreshes == 1
    # reuse chains end after REUSE_LIMIT jobs in a row
    bundled.last_keys = None
    assert bundled.fill(typed, sampling, cache="dual", reuse_prefix=True).refreshes == 1
    starts = [bundled.fill(typed, sampling, cache="dual", reuse_prefix=True).reused > 0 for _ in range(REUSE_LIMIT + 1)]
    assert starts == [True] * REUSE_LIMIT + [False]


# ---------------------------------------------------------------- warm start (provisional draft tokens)

class Wants:
    """A context model: every scored position prefers `want[i]` (p ~ 0.94 over the 10 tokens),
    so a draft token that differs scores ~0.006 there. Records the masked positions at each forward."""

    def __init__(self, want):
        self.want = want
        self.masked_at = []

    def __call__(self, canvas, positions):
        self.masked_at.append((canvas == MASK).nonzero().squeeze(-1).tolist())
        logits = torch.zeros(len(positions), VOCAB)
        logits[torch.arange(len(positions)), torch.tensor(self.want)[positions]] = 5.0
        return logits


def test_no_provisional_tokens_decode_as_before():
    canvas = torch.tensor([1, MASK, MASK, MASK, 2])
    model = Wants([1, 3, 4, 5, 2])
    plain = denoise(model, canvas, MASK, Sampling(threshold=0.99))
    none_drafted = denoise(Wants([1, 3, 4, 5, 2]), canvas, MASK, Sampling(threshold=0.99),
                           provisional=torch.zeros(5, dtype=torch.bool))
    assert plain.canvas.tolist() == none_drafted.canvas.tolist() == [1, 3, 4, 5, 2]
    assert plain.forwards == none_drafted.forwards == 3 and none_drafted.remasked == 0


def test_a_draft_the_model_agrees_with_takes_one_forward_and_stays():
    canvas = torch.tensor([1, 3, 4, 5, 2])
    model = Wants([1, 3, 4, 5, 2])
    result = denoise(model, canvas, MASK, Sampling(threshold=0.99), provisional=torch.tensor([0, 1, 1, 1, 0]).bool())
    assert result.canvas.tolist() == [1, 3, 4, 5, 2]
    assert (result.forwards, result.drafted, result.remasked) == (1, 3, 0)


def test_typing_a_divergent_character_remasks_only_the_conflict_window_and_stale_draft_tokens():
    """The old suggestion was "return x + 1\\n"; the user typed "return y". warm_start.align re-masks the
    conflict (" x") and one token after it; " 1" and "\\n" stay provisional. Under the new context
    the model wants " * 2\\n": " 1" has lost its confidence and is re-masked at the first forward,
    "\\n" is kept; the hole ends as the new context wants it."""
    from diffu_lsp.warm_start import align, canvas_of

    vocab = {2: "return", 3: " x", 4: " +", 5: " 1", 6: "\n", 7: " y", 8: " *", 1: " 2"}
    old_text = "def f(x):\n    \n"
    cursor = old_text.index("\n", 10)
    previous = canvas_of(old_text, cursor, cursor, [2, 3, 4, 5, 6])
    new_text = old_text[:cursor] + "return y" + old_text[cursor:]
    new_cursor = cursor + len("return y")
    aligned = align(previous, new_text, new_cursor, new_cursor, 5, mask_id=MASK, piece=vocab.get, window=1)
    assert aligned.ids == [MASK, MASK, 5, 6, MASK] and aligned.remasked == 2
    # canvas: [prefix token 0] + hole of 5 + [suffix token 0]; the new context wants " * 2\n" and a pad (0)
    canvas = torch.tensor([0] + aligned.ids + [0])
    model = Wants([0, 8, 1, 1, 6, 0, 0])
    result = denoise(model, canvas, MASK, Sampling(threshold=0.9),
                     provisional=torch.tensor([False] + aligned.provisional + [False]))
    assert model.masked_at[0] == [1, 2, 5]       # the conflict window and the empty tail, nothing else
    assert 3 in model.masked_at[1]               # " 1" was re-masked: its confidence dropped
    assert 4 not in model.masked_at[1]           # "\n" kept its place
    assert result.canvas.tolist() == [0, 8, 1, 1, 6, 0, 0]
    assert (result.drafted, result.remasked) == (2, 1)


def test_draft_eos_pads_the_masks_after_it_with_early_exit():
    canvas = torch.tensor([3, 0, MASK, MASK])
    model = Wants([3, 0, 0, 0])
    result = denoise(model, canvas, MASK, Sampling(threshold=0.9, early_exit=True), stop_ids=(0,),
                     provisional=torch.tensor([True, True, False, False]))
    assert result.canvas.tolist() == [3, 0, 0, 0] and result.forwards == 1
    assert (result.drafted, result.remasked) == (4, 0)  # the padded slots are draft tokens too


@pytest.mark.parametrize("cache", ["none", "prefix", "dual", "delayed"])
def test_warm_start_on_the_bundled_model_in_every_cache_mode(bundled, cache):
    """No provisional tokens: tokens identical to a cold job. A draft equal to what cold decoding
    produced is checked, not kept blindly; where the model keeps all of it the result is the same."""
    sampling = Sampling(alg="factor", factor=3.0, early_exit=True)
    kept = 0
    ends_at_once = PREFIX + "return f.read"
    for reuse, before in ((False, PREFIX), (True, PREFIX), (False, ends_at_once), (True, ends_at_once)):
        prefix, suffix, hole = bundled.encode(before), bundled.encode(SUFFIX), 16
        canvas = prefix + [bundled.mask_token_id] * hole + suffix
        bundled.last_keys = None
        cold = bundled.fill(canvas, sampling, cache=cache, reuse_prefix=reuse)
        bundled.last_keys = None
        off = bundled.fill(canvas, sampling, cache=cache, reuse_prefix=reuse, provisional=[False] * len(canvas))
        assert off.canvas.tolist() == cold.canvas.tolist() and off.forwards == cold.forwards
        draft = cold.canvas.tolist()
        marks = [False] * len(prefix) + [True] * hole + [False] * len(suffix)
        warm = bundled.fill(draft, sampling, cache=cache, reuse_prefix=reuse, provisional=marks)
        assert warm.drafted == hole and bundled.mask_token_id not in warm.canvas.tolist()
        if warm.remasked == 0:
            kept += 1
            assert warm.canvas.tolist() == cold.canvas.tolist() and warm.forwards == 1
    assert kept >= 1  # the hole the model ends at once ("return f.read|"): its draft is kept, same result


# ---------------------------------------------------------------- token editing (T2T, edit_threshold)

class Scored(Wants):
    """Wants, also recording which positions each forward scored."""

    def __init__(self, want, strength=5.0):
        super().__init__(want)
        self.strength, self.scored = strength, []

    def __call__(self, canvas, positions):
        self.scored.append(positions.tolist())
        logits = torch.zeros(len(positions), VOCAB)
        logits[torch.arange(len(positions)), torch.tensor(self.want)[positions]] = self.strength
        return logits


def test_an_edit_replaces_a_draft_token_only_at_or_above_the_threshold():
    """p(wanted token) = e^5 / (e^5 + 9) ~ 0.943: a draft token the model disagrees with is replaced
    at edit_threshold 0.9 and left as it is at 0.95 (remask 0: T2T alone, nothing masked)."""
    canvas, draft = torch.tensor([1, 3, 4, 2]), torch.tensor([False, True, True, False])
    edited = denoise(Scored([1, 7, 4, 2]), canvas, MASK, Sampling(edit_threshold=0.9, remask=0.0), provisional=draft)
    assert edited.canvas.tolist() == [1, 7, 4, 2] and edited.edits == 1 and edited.remasked == 0
    assert edited.forwards == 2  # the edit, then a forward that edits nothing
    kept = denoise(Scored([1, 7, 4, 2]), canvas, MASK, Sampling(edit_threshold=0.95, remask=0.0), provisional=draft)
    assert kept.canvas.tolist() == [1, 3, 4, 2] and kept.edits == 0 and kept.forwards == 1


def test_a_doubted_draft_token_below_the_edit_threshold_is_masked_again_and_decoded():
    """The same draft at edit_threshold 0.95 with remask 0.5: no edit fires, but p(3) ~ 0.006 < 0.5,
    so the draft token is masked (T2M) and decoded again; the draft the model supports stays."""
    canvas, draft = torch.tensor([1, 3, 4, 2]), torch.tensor([False, True, True, False])
    model = Scored([1, 7, 4, 2], strength=5.0)
    result = denoise(model, canvas, MASK, Sampling(threshold=0.9, edit_threshold=0.95, remask=0.5), provisional=draft)
    assert result.canvas.tolist() == [1, 7, 4, 2] and (result.edits, result.remasked) == (0, 1)
    assert model.scored[1] == [1, 2]  # the masked position decoded, the kept draft re-checked beside it


def test_edits_never_touch_text_outside_the_job_s_holes():
    """The model would rewrite the context (positions 0 and 4) with confidence; only the hole's
    positions are ever scored, and the context comes back as it was."""
    canvas = torch.tensor([1, MASK, MASK, MASK, 2])
    model = Scored([8, 3, 4, 5, 8])
    result = denoise(model, canvas, MASK, Sampling(threshold=0.9, edit_threshold=0.5))
    assert result.canvas.tolist() == [1, 3, 4, 5, 2]
    assert all(set(scored) <= {1, 2, 3} for scored in model.scored)


class Revises:
    """Position 1 wants token 3 while position 2 is masked, token 5 once it is revealed (strongly);
    positions 2 and 3 want 4 and 6, less and less sure: revealed one per forward after position 1."""

    def __call__(self, canvas, positions):
        want = {1: (3 if int(canvas[2]) == MASK else 5, 5.0), 2: (4, 2.0), 3: (6, 1.0)}
        logits = torch.zeros(len(positions), VOCAB)
        for row, at in enumerate(positions.tolist()):
            token, strength = want[at]
            logits[row, token] = strength
        return logits


def test_a_token_revealed_earlier_in_the_job_is_edited_when_the_context_changes_the_model_s_mind():
    canvas = torch.tensor([1, MASK, MASK, MASK, 2])
    masked_only = denoise(Revises(), canvas, MASK, Sampling(threshold=0.9))
    assert masked_only.canvas.tolist() == [1, 3, 4, 6, 2] and masked_only.forwards == 3
    editing = denoise(Revises(), canvas, MASK, Sampling(threshold=0.9, edit_threshold=0.9))
    assert editing.canvas.tolist() == [1, 5, 4, 6, 2] and editing.edits == 1
    assert editing.forwards == 4  # reveal 1, reveal 2, edit 1 and reveal 3, check: nothing to edit


class Flips:
    """Always wants a different token than the one there (0 <-> 3): edits that never settle."""

    def __call__(self, canvas, positions):
        logits = torch.zeros(len(positions), VOCAB)
        logits[torch.arange(len(positions)), torch.where(canvas[positions] == 3, 0, 3)] = 9.0
        return logits


def test_edits_that_keep_firing_stop_at_the_step_cap():
    from diffu_lsp.sampler import EDIT_ROUNDS

    result = denoise(Flips(), torch.tensor([1, 3, 2]), MASK, Sampling(edit_threshold=0.9),
                     provisional=torch.tensor([False, True, False]))
    assert result.forwards == EDIT_ROUNDS and result.edits == EDIT_ROUNDS


def test_edit_threshold_unset_decodes_exactly_as_before():
    """Without edit_threshold a draft the model disagrees with is masked again and re-decoded (warm
    start as before); with it, the same draft is edited in place in one forward."""
    canvas, draft = torch.tensor([1, 3, MASK, 2]), torch.tensor([False, True, False, False])
    before = denoise(Scored([1, 7, 4, 2]), canvas, MASK, Sampling(threshold=0.9), provisional=draft)
    assert before.canvas.tolist() == [1, 7, 4, 2] and (before.remasked, before.edits) == (1, 0)
    assert before.forwards == 2
    editing = denoise(Scored([1, 7, 4, 2]), canvas, MASK, Sampling(threshold=0.9, edit_threshold=0.9),
                      provisional=draft)
    assert editing.canvas.tolist() == [1, 7, 4, 2] and (editing.remasked, editing.edits) == (0, 1)


def test_edit_threshold_must_be_a_probability():
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError):
            Sampling(edit_threshold=bad)
