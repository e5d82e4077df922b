"""bench edit: the corruptions it makes and how it scores a refined line (pure functions)."""

import random

from diffu_lsp.bench.edit import Case, changed_spans, corrupt, score


def test_near_miss_corruption_is_an_off_by_one_literal_or_a_swapped_operator_at_the_reported_span():
    for seed in range(20):
        made = corrupt("if count < 10:", "near-miss", 1, [], [], random.Random(seed))
        new, ((a, b),) = made
        assert new in ("if count > 10:", "if count < 11:", "if count < 9:")
        assert new[:a] + "<" + new[b:] == "if count < 10:" or new[:a] + "10" + new[b:] == "if count < 10:"


def test_identifier_corruptions_draw_from_the_file_or_the_pool_and_never_leave_the_line_as_it_was():
    rng = random.Random(0)
    new, spans = corrupt("total = price * qty", "same-file", 2, ["price", "qty", "total", "rate"], [], rng)
    assert new != "total = price * qty" and len(spans) == 2
    assert all(new[a:b] in ("price", "qty", "total", "rate") for a, b in spans)
    new, ((a, b),) = corrupt("total = price * qty", "random", 1, [], ["zebra"], random.Random(1))
    assert new[a:b] == "zebra"
    assert corrupt("x = 1", "random", 1, [], ["x"], rng) is None  # nothing to swap in: no case


def _case(original, corrupted, spans):
    prefix = "def f():\n    "
    return Case("f.py", prefix + corrupted + "\n", len(prefix), len(prefix) + len(corrupted), original, spans, "k")


def test_score_restored_detected_collateral_and_controls():
    case = _case("n = a + 1", "n = a - 1", ((6, 7),))
    assert score(case, "n = a + 1") == {"control": False, "restored": True, "caught": 1, "corrupted": 1,
                                        "collateral": False}
    assert score(case, "m = a - 1")["caught"] == 0 and score(case, "m = a - 1")["collateral"]
    assert score(case, "n = a * 1")["caught"] == 1 and not score(case, "n = a * 1")["restored"]
    control = _case("n = a + 1", "n = a + 1", ())
    assert score(control, "n = a + 1") == {"control": True, "untouched": True}
    assert score(control, "n = a + 2") == {"control": True, "untouched": False}
    assert changed_spans("abc", "abc") == []


class CharModel:
    """One token per character; p(token) is high for every character but 'X' (or flat)."""

    def __init__(self, flat: bool = False):
        self.flat = flat

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def position_logits(self, canvas, positions):
        import torch

        logits = torch.zeros(len(positions), 256)
        if not self.flat:
            current = canvas[positions]
            logits[torch.arange(len(positions)), current] = torch.where(current == ord("X"), -5.0, 5.0)
        return logits


def test_judging_auc_ranks_corrupted_tokens_against_clean_ones():
    from diffu_lsp.bench.edit import Case, judging_auc

    text = "def f(a):\n    return a + 1\n"
    start = text.index("return")
    end = text.index("\n", start)
    wrong = text[:start] + "return XX + 1" + text[end:]
    cases = [Case("f.py", wrong, start, start + len("return XX + 1"), "return a + 1", ((7, 9),), "random"),
             Case("f.py", text, start, end, "return a + 1", (), "control")]
    assert judging_auc(CharModel(), cases) == 1.0  # every corrupted token is the least likely
    assert judging_auc(CharModel(flat=True), cases) == 0.5  # a model that cannot tell: chance
