import pytest

from diffu_lsp.postprocess import (
    DEFAULT_TEXT_FILTERS,
    Context,
    auto_closed_tail,
    balance_brackets,
    cut_at_control_character,
    cut_at_stop,
    drop_low_confidence_tail,
    drop_suffix_duplicate,
    drop_whitespace_only,
    first_line_only,
    limit_scope_by_indentation,
    postprocess_text,
    trim_trailing_whitespace,
)

EOS, PAD = 0, 1


# --- token stage -----------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, confidences, expected",
    [
        ([5, 6, EOS, 7], [0.9, 0.8, 0.7, 0.6], ([5, 6], [0.9, 0.8])),
        ([5, PAD, EOS], [0.9, 0.8, 0.7], ([5], [0.9])),
        ([EOS, 5], [0.9, 0.8], ([], [])),
        ([5, 6], [0.9, 0.8], ([5, 6], [0.9, 0.8])),
        ([], [], ([], [])),
    ],
)
def test_cut_at_stop(ids, confidences, expected):
    assert cut_at_stop(ids, confidences, {EOS, PAD}) == expected


@pytest.mark.parametrize(
    "confidences, threshold, keep",
    [
        ([0.9, 0.8, 0.3, 0.2], 0.5, 2),
        ([0.9, 0.2, 0.8, 0.3], 0.5, 3),  # only the tail goes; a low token inside stays
        ([0.2, 0.1], 0.5, 0),
        ([0.2, 0.1], 0.0, 2),  # threshold 0 keeps everything
        ([0.9, 0.5], 0.5, 2),  # equal is kept
    ],
)
def test_drop_low_confidence_tail(confidences, threshold, keep):
    ids = list(range(10, 10 + len(confidences)))
    assert drop_low_confidence_tail(ids, confidences, threshold) == (ids[:keep], confidences[:keep])


# --- text filters, one table each ------------------------------------------------------


def ctx(doc: str, multiline: bool = False) -> Context:
    """A document with ``|`` at the cursor."""
    prefix, suffix = doc.split("|")
    return Context(prefix=prefix, suffix=suffix, multiline=multiline)


def test_context_lines():
    c = ctx("import os\nx = os.pa|th\r\ny = 1\n")
    assert (c.line_before, c.line_after) == ("x = os.pa", "th")


@pytest.mark.parametrize("text, expected", [("", ""), ("  \n\t\n", ""), (" x ", " x ")])
def test_drop_whitespace_only(text, expected):
    assert drop_whitespace_only(text, ctx("|")) == expected


@pytest.mark.parametrize("text, expected", [
    ("\x00filler149152\x00filler43088", ""),          # what a random-weight checkpoint suggested
    ("name)\x1b[0m", "name)"),                         # an escape sequence: the text before it
    ("if x:\n\treturn 1\r\n", "if x:\n\treturn 1\r\n"),  # tab and line breaks are code
    ("a\x7fb", "a"),
])
def test_cut_at_control_character(text, expected):
    assert cut_at_control_character(text, ctx("x = |")) == expected


@pytest.mark.parametrize(
    "doc, text, expected",
    [
        ("x = os.pa|\n", "th.join(a, b)\nprint(x)", "th.join(a, b)"),
        ("x = 1|\nz = 3\n", "\ny = 2\nw = 4", "\ny = 2"),  # next line, at the end of a line
        ("x = 1|\n", "\n\n    y = 2", "\n    y = 2"),
        ("x = foo(|)\n", "\na)", ""),  # a line break cannot split the cursor's line
        ("x = |\n", "\n\n", ""),
        ("x = |\n", "42", "42"),
    ],
)
def test_first_line_only(doc, text, expected):
    assert first_line_only(text, ctx(doc)) == expected


def test_first_line_only_leaves_multiline_alone():
    assert first_line_only("a\nb", ctx("|", multiline=True)) == "a\nb"


@pytest.mark.parametrize(
    "doc, text, expected",
    [
        # after an opener: body lines deeper than the def; the next def ends it
        ("def area(r):|\n", "\n    pi = 3.14\n    return pi * r * r\n\ndef main():\n    pass", "\n    pi = 3.14\n    return pi * r * r\n"),
        # nested blocks may go deeper and come back to the body level
        (
            "def f(xs):|\n",
            "\n    for x in xs:\n        print(x)\n    return len(xs)\nprint(f)",
            "\n    for x in xs:\n        print(x)\n    return len(xs)",
        ),
        # `else:` at the `if`'s indentation leaves the block the cursor opened
        ("    if ok:|\n", "\n        run()\n    else:\n        stop()", "\n        run()"),
        # a closing bracket back at the opener's indentation is kept and ends the fill
        ("config = {|\n", '\n    "a": 1,\n    "b": 2,\n}\nprint(config)', '\n    "a": 1,\n    "b": 2,\n}'),
        # blank line at the cursor's column: may not dedent below it
        ("def f():\n    x = 1\n    |\n", "y = 2\n    return x + y\n\ndef g():", "y = 2\n    return x + y\n"),
        # blank line at column 0 after an opener: the first completed line sets the level
        ("def f():\n|\n", "    a = 1\n    return a\nprint(f())", "    a = 1\n    return a"),
        # a first completed line that does not indent after the opener is not a body
        ("def f():|\n", "\nreturn 1", ""),
    ],
)
def test_limit_scope_by_indentation(doc, text, expected):
    assert limit_scope_by_indentation(text, ctx(doc, multiline=True)) == expected


def test_limit_scope_by_indentation_leaves_single_line_alone():
    assert limit_scope_by_indentation("a\nb", ctx("def f():|", multiline=False)) == "a\nb"


@pytest.mark.parametrize(
    "doc, text, expected",
    [
        # the fill's tail repeats the code after the cursor
        (
            "def f(x):\n    |\n\ndef g():\n    pass\n",
            "return x\n\ndef g():\n    pass",
            "return x",
        ),
        # ... or a cut-off start of it
        ("def f(x):\n    |\n\ndef g():\n    pass\n", "return x\n\ndef g(", "return x"),
        # the whole fill is the start of the suffix
        ("x = |foo(1)\n", "foo(", ""),
        ("def f(x):\n    |\n    return x\n", "\n    return x", ""),
        # not a repeat: the line differs
        ("def f(x):\n    |\n    return x\n", "y = x\n    return x + 1", "y = x\n    return x + 1"),
        # the first line continues the cursor's line and is not compared as a whole line
        ("x = |\ny = 2\n", "1\ny = 2", "1"),
    ],
)
def test_drop_suffix_duplicate(doc, text, expected):
    assert drop_suffix_duplicate(text, ctx(doc, multiline=True)) == expected


@pytest.mark.parametrize(
    "doc, text, expected",
    [
        ("print(|)\n", '"hi")', '"hi"'),  # the suffix supplies the ")"
        ('print("|")\n', 'hello")', "hello"),  # ... and the closing quote
        ("foo(bar(|))\n", "x))", "x"),
        ("foo(bar(|)\n", "x))", "x)"),  # the suffix supplies only the outer ")"
        ("x = compute(|\n", "a, b))\nprint(x)", "a, b)"),  # cut where it closes more than opened
        ("x = [|\n", "1, 2)", "1, 2"),  # mismatched closer
        ("print(|)\n", "f(x)", "f(x)"),  # balanced fill: nothing to trim
        ("if foo(|)\n", "x):", "x):"),  # closer not at the end: left to auto_closed_tail
        ("call(|)\n", "a, b)  ", "a, b"),
        ('s = "a(b" + |\n', '"c)"', '"c)"'),  # brackets in strings do not count
        ("x = 1  # (|\n", ")", ")"),  # ... nor in comments
        ("d = {\n    'k': [|]\n", "1, 2]", "1, 2"),  # opener on an earlier line
    ],
)
def test_balance_brackets(doc, text, expected):
    assert balance_brackets(text, ctx(doc)) == expected


@pytest.mark.parametrize(
    "doc, text, expected",
    [
        ("x = |\n", "1  \n  \ny = 2\t\n\n", "1\n\ny = 2"),
        ("x = |+ 1\n", "a ", "a "),  # text follows on the cursor's line: keep the last line's space
        ("x = |+ 1\n", "a  \nb ", "a\nb "),
    ],
)
def test_trim_trailing_whitespace(doc, text, expected):
    assert trim_trailing_whitespace(text, ctx(doc)) == expected


@pytest.mark.parametrize(
    "line_after, completion, expected",
    [
        (")", '"hi")', 1),
        ('")', 'hello")', 2),  # fill started inside the string
        ("))", "x))", 2),
        (")", "x))", 1),
        (")", "f(x)", 0),  # the fill's own ")" closes its own "("
        (")", "x):", 1),  # ")" typed before the ":"
        ("):", "a, b)", 1),
        ("):", "a, b):", 2),
        (")", ")", 1),
        ("]", "x)", 0),
        ("", "x)", 0),
        (") + 1", "x)", 1),
        (")", '")"', 0),  # a ")" inside a string is not a closer
        (")", "line one\n    last)", 1),  # only the last line counts
    ],
)
def test_auto_closed_tail(line_after, completion, expected):
    assert auto_closed_tail(line_after, completion) == expected


# --- whole pipeline ---------------------------------------------------------------


@pytest.mark.parametrize(
    "doc, multiline, raw, expected",
    [
        # function body, model then re-emits the next function
        (
            "import math\n\n\ndef area(r):|\n\n\ndef main():\n    print(area(2))\n",
            True,
            "\n    return math.pi * r ** 2  \n\n\ndef main():\n    print(area(2))\n",
            "\n    return math.pi * r ** 2",
        ),
        # loop body on a blank line, stops at the dedent
        (
            "def total(xs):\n    s = 0\n    for x in xs:\n        |\n    return s\n",
            True,
            "s += x\n        count += 1\n    return s\n",
            "s += x\n        count += 1",
        ),
        # single line inside auto-closed parentheses
        ("import os\npath = os.path.join(|)\n", False, "root, name)\nprint(path)", "root, name"),
        # single line at the end of a statement, model continues on the next line
        ("x = load()|\nprint(x)\n", False, "\ny = x.strip()\nz = 1", "\ny = x.strip()"),
        # nothing but whitespace
        ("x = |\n", False, "   \n\n", ""),
        # model just repeats the code after the cursor
        ("def f():\n    |\n    return 1\n", True, "return 1\n", ""),
        # dict literal: closer line kept, trailing code dropped
        (
            "CONFIG = {|\n",
            True,
            '\n    "steps": 16,\n    "threshold": 0.9,\n}\n\nprint(CONFIG)',
            '\n    "steps": 16,\n    "threshold": 0.9,\n}',
        ),
    ],
)
def test_pipeline(doc, multiline, raw, expected):
    assert postprocess_text(raw, ctx(doc, multiline)) == expected


def test_pipeline_stops_on_empty():
    calls = []

    def spy(text, c):
        calls.append(text)
        return text

    assert postprocess_text("  ", ctx("x = |"), (drop_whitespace_only, spy)) == ""
    assert calls == []
    assert postprocess_text("x", ctx("|"), (spy,)) == "x"
    assert calls == ["x"]


def test_default_filters_order():
    assert DEFAULT_TEXT_FILTERS[0] is drop_whitespace_only
    assert DEFAULT_TEXT_FILTERS[-1] is drop_whitespace_only
    assert DEFAULT_TEXT_FILTERS.index(first_line_only) < DEFAULT_TEXT_FILTERS.index(limit_scope_by_indentation)


@pytest.mark.parametrize("prefix, kept, healed", [
    ("def f():\n    return ", "def f():\n    return", " "),     # the space joins the next word
    ("def f():\n    ", "def f():\n", "    "),                   # an indented empty line: the model writes the indentation
    ("def f():\n\t\t", "def f():\n", "\t\t"),
    ("def f():\n", "def f():\n", ""),
    ("x = 1", "x = 1", ""),
    ("", "", ""),
])
def test_token_healing_cuts_trailing_blanks(prefix, kept, healed):
    from diffu_lsp.features import _split_trailing_blanks

    assert _split_trailing_blanks(prefix) == (kept, healed)
    assert kept + healed == prefix


def test_a_streamed_block_draft_leaves_the_healed_indentation_in_the_document():
    """Complete Block streams its draft at the cursor. At an indented empty line the hole took
    the indentation over (token healing), so the model's text starts with it; the final text
    drops it, and so must every draft, or the editor shows the block indented twice until the
    job ends. The bundled model's drafts began with 8 more blanks than its final text."""
    from diffu_lsp.features import suggest
    from diffu_lsp.models import load_model
    from diffu_lsp.settings import Settings

    model = load_model(None)
    text = "def total(items):\n    count = 0\n    for item in items:\n        \n    return count\n"
    cursor = text.index("        \n") + 8
    drafts = []
    final = suggest(model, text, cursor, Settings(), block=True, on_step=lambda step: drafts.append(step.text))
    assert drafts and final.text
    indentation = lambda block: len(block) - len(block.lstrip(" \t"))  # noqa: E731
    assert indentation(drafts[-1]) == indentation(final.text) < 8
