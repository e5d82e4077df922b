import re
import time

import pytest

from diffu_lsp.infill import (
    Hole,
    HoleCanvas,
    InfillRequest,
    build_request,
    enclosing_block,
    fill_canvas,
    find_holes,
    indent_width,
    is_block_opener,
    refine_request,
    wants_multiline,
    window,
)
from diffu_lsp.settings import Settings


def chars(s: str) -> list[str]:
    """One token per character: budgets become character counts."""
    return list(s)


def words(s: str) -> list[str]:
    """A BPE-like stand-in: words, punctuation and whitespace runs."""
    return re.findall(r"\w+|[^\w\s]|\s+", s)


def split(doc: str) -> tuple[str, int]:
    """A document with ``|`` marking the cursor -> (text, offset)."""
    cursor = doc.index("|")
    return doc[:cursor] + doc[cursor + 1 :], cursor


# --- openers and multi-line ---------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "def f(x):",
        "    for i in range(3):  ",
        "class A(Base):  # a comment",
        "else:",
        "if x == '#':",
        "config = {",
        "call(",
        "items = [",
        "const f = (x) =>",
        "while true do",
        "if x then",
        "if (x) { // go",
        "with open(p) as f: # comment with 'quote",
    ],
)
def test_block_openers(line):
    assert is_block_opener(line)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "x = 1",
        "return x",
        "d[1:",  # slice
        "f = lambda x:",  # lambda body is an expression
        "def f() ->",  # return annotation
        "print('if x:')",
        "x = ':'",
        "to_do",
        "x = {}  # {",
        "s = 'open ('",
    ],
)
def test_not_block_openers(line):
    assert not is_block_opener(line)


@pytest.mark.parametrize(
    "doc, expected",
    [
        ("def f(x):|\n", True),  # after an opener
        ("def f(x):|  \n    return x\n", True),  # trailing whitespace only
        ("x = foo(|)\n", False),  # text after the cursor
        ("x = 1|\n", False),  # end of an ordinary statement
        ("def f(x):\n    |\n", True),  # body line right after the opener
        ("def f(x):\n    |\n    return x\n", True),  # right after the opener, body below
        ("def f(x):\n    y = 1\n    |\n\ndef g():\n    pass\n", True),  # next code line dedented
        ("def f(x):\n    y = 1\n    |\n    return y\n", False),  # between statements
        ("import os\n|\nimport sys\n", False),  # top level, code continues
        ("import os\n\n|", True),  # end of file
        ("def f(x):\n    y = 1\n    |", True),  # end of file in a body
        ("if a:\n    if b:\n        x = 1\n        |\n    y = 2\n", True),  # closes the inner block
        ("class A:\n    x = 1\n    |\n    y = 2\n", False),
    ],
)
def test_wants_multiline(doc, expected):
    text, cursor = split(doc)
    assert wants_multiline(text, cursor) is expected


def test_indent_width():
    assert indent_width("    x") == 4
    assert indent_width("\tx") == 8
    assert indent_width("  \tx") == 8
    assert indent_width("x") == 0
    assert indent_width("   ") == 3


# --- windows ---------------------------------------------------------------------

DOC = "aaaa\nbbbb\ncc|cc\ndddd\neeee\n"


@pytest.mark.parametrize(
    "prefix_tokens, suffix_tokens, prefix, suffix",
    [
        (100, 100, "aaaa\nbbbb\ncc", "cc\ndddd\neeee\n"),  # everything fits
        (12, 100, "aaaa\nbbbb\ncc", "cc\ndddd\neeee\n"),  # exactly fits
        (11, 100, "bbbb\ncc", "cc\ndddd\neeee\n"),  # partial first line dropped
        (7, 7, "bbbb\ncc", "cc\ndddd"),  # line snapping on both sides
        (6, 6, "cc", "cc"),  # only the cursor's line
        (1, 0, "cc", "cc"),  # cursor's line kept whole over budget
    ],
)
def test_window_budgets(prefix_tokens, suffix_tokens, prefix, suffix):
    text, cursor = split(DOC)
    assert window(text, cursor, chars, prefix_tokens, suffix_tokens) == (prefix, suffix)


def test_window_with_word_tokens():
    doc = "import os\n\n\ndef main(argv):\n    args = parse(argv)\n    return run(|args)\n\n\nmain()\n"
    text, cursor = split(doc)
    # "    return run(" is 5 tokens, "    args = parse(argv)\n" 10, "def main(argv):\n" 8; "args)" 2, "\n" 1.
    assert window(text, cursor, words, 15, 3) == ("    args = parse(argv)\n    return run(", "args)\n")
    assert window(text, cursor, words, 14, 2) == ("    return run(", "args)")
    assert window(text, cursor, words, 23, 100) == (
        "def main(argv):\n    args = parse(argv)\n    return run(",
        "args)\n\n\nmain()\n",
    )


def test_window_budget_is_exact_when_lines_merge():
    def merging(s):  # a blank line after a line costs 5 extra tokens, seen only across lines
        return list(s) + [0] * (5 * s.count("\n\n"))

    text, cursor = split("x\n\ny\nc|\nd\n\ne")
    assert window(text, cursor, merging, 6, 4) == ("\ny\nc", "\nd\n")


def test_window_edges():
    assert window("", 0, chars, 10, 10) == ("", "")
    assert window("abc", 0, chars, 10, 10) == ("", "abc")
    assert window("abc", 3, chars, 10, 10) == ("abc", "")
    assert window("a\n", 2, chars, 10, 10) == ("a\n", "")
    with pytest.raises(ValueError):
        window("abc", 4, chars, 10, 10)


def test_window_crlf_keeps_line_endings():
    text, cursor = split("one\r\ntwo\r\nth|ree\r\nfour\r\n")
    assert window(text, cursor, chars, 100, 100) == ("one\r\ntwo\r\nth", "ree\r\nfour\r\n")
    assert window(text, cursor, chars, 7, 4) == ("two\r\nth", "ree\r")


def test_window_huge_document_is_fast():
    line = "    value = compute(alpha, beta, gamma)  # some comment here\n"
    text = line * (4_000_000 // len(line))
    cursor = len(text) // 2 + 7
    calls = []

    def counting_encode(s):
        calls.append(len(s))
        return words(s)

    started = time.perf_counter()
    prefix, suffix = window(text, cursor, counting_encode, 768, 256)
    assert time.perf_counter() - started < 0.5
    assert max(calls) <= 768 * 16 + len(line)
    assert prefix.endswith(text[cursor - 7 : cursor]) and text[:cursor].endswith(prefix)
    assert suffix.startswith(text[cursor : cursor + 10]) and text[cursor:].startswith(suffix)
    assert prefix.startswith("    value")  # snapped to a line start
    assert suffix.endswith("comment here")  # snapped to a line end
    assert 700 < len(words(prefix)) <= 768
    assert 200 < len(words(suffix)) <= 256


def test_window_single_huge_line_is_capped():
    text = "x" * 4_000_000
    prefix, suffix = window(text, 2_000_000, chars, 10, 10)
    assert prefix == "x" * 160 and suffix == "x" * 160


# --- requests --------------------------------------------------------------------


def test_build_request_single_line():
    text, cursor = split("import os\nx = os.pa|\nprint(x)\n")
    request = build_request(text, cursor, chars, Settings())
    assert request == InfillRequest(
        prefix="import os\nx = os.pa", suffix="\nprint(x)\n", hole_tokens=16, multiline=False, cursor=cursor
    )


def test_build_request_multi_line_and_block():
    text, cursor = split("def area(r):|\n")
    settings = Settings(multi_line_tokens=40, block_tokens=80, prefix_tokens=5)
    request = build_request(text, cursor, chars, settings)
    assert (request.prefix, request.suffix, request.hole_tokens, request.multiline) == ("def area(r):", "\n", 40, True)
    block = build_request(text, cursor, chars, settings, block=True)
    assert (block.hole_tokens, block.multiline) == (80, True)


def test_refine_request():
    text = "a = 1\nb = compute(a)\nc = b\n"
    start = text.index("compute")
    end = text.index("\nc")
    assert refine_request(text, start, end, chars, 100, 100) == ("a = 1\nb = ", "compute(a)", "\nc = b\n")
    assert refine_request(text, start, end, chars, 4, 0) == ("b = ", "compute(a)", "")
    with pytest.raises(ValueError):
        refine_request(text, end, start, chars, 4, 0)


# --- holes -----------------------------------------------------------------------

MARKERS = ("...", "pass  # TODO", "# TODO: fill")

HOLEY = '''\
def area(r):
    ...

def norm(v): ...

def scale(v, k):
    pass  # TODO

def clamp(x):
    # TODO: fill with bounds check
    return x

class Shape:
    def draw(self) -> None:  ...  # later
'''


def marked(text: str, holes: list[Hole]) -> list[str]:
    return [text[h.start : h.end] for h in holes]


def test_find_holes_all_kinds():
    holes = find_holes(HOLEY, 0, len(HOLEY), MARKERS)
    assert marked(HOLEY, holes) == ["...", "...", "pass  # TODO", "# TODO: fill with bounds check", "..."]
    first = holes[0]
    assert HOLEY[first.start - 4 : first.start] == "    "  # indentation stays outside the hole
    assert HOLEY[holes[1].start - 13 : holes[1].end] == "def norm(v): ..."


@pytest.mark.parametrize(
    "line",
    [
        "x = arr[...]",
        'msg = "..."',
        "x = ...",
        "f = lambda: ...",
        "print('...')",
        "def f(x=...): return x",
        "    # notes ... more",
        "x = 1  # TODO: fill",  # a comment marker must start the line
    ],
)
def test_find_holes_negatives(line):
    text = f"def f():\n    {line}\n"
    assert find_holes(text, 0, len(text), MARKERS) == []


def test_find_holes_range_and_custom_marker():
    text = "a = <FILL>\nb = <FILL> + <FILL>\nc = <FILL>\n"
    start = text.index("b")
    end = text.index("c")
    holes = find_holes(text, start, end, ["<FILL>"])
    assert [(h.start, h.end) for h in holes] == [(15, 21), (24, 30)]
    assert marked(text, holes) == ["<FILL>", "<FILL>"]


def test_find_holes_with_a_range_past_the_end_stops_at_the_end():
    """It looped forever when `end` was more than one past the text (a job for a changed text)."""
    text = "a = <FILL>\n"
    assert marked(text, find_holes(text, 0, len(text) + 50, ["<FILL>"])) == ["<FILL>"]
    assert find_holes("x = 1", 0, 40, ["<FILL>"]) == []


def test_a_job_s_offsets_must_be_a_range_of_its_text():
    import msgspec

    from diffu_lsp.job import Request

    assert Request("refine", "abc", 1, 3, Settings()).end == 3
    for start, end in ((0, 4), (-1, 2), (2, 1)):
        with pytest.raises(ValueError, match="not a range of the text's 3 characters"):
            Request("refine", "abc", start, end, Settings())
    body = msgspec.json.encode(Request("suggest", "abc", 3, 3, Settings())).replace(b'"end":3', b'"end":9')
    with pytest.raises(msgspec.ValidationError, match="not a range"):  # what a daemon or a replica decodes
        msgspec.json.decode(body, type=Request)


def test_find_holes_ignores_empty_marker():
    assert find_holes("x = 1\n", 0, 6, ["", "<FILL>"]) == []


def test_find_holes_overlapping_markers_keep_first():
    text = "    pass  # TODO\n"
    holes = find_holes(text, 0, len(text), ["pass  # TODO", "# TODO"])
    assert marked(text, holes) == ["pass  # TODO"]


# --- enclosing block ---------------------------------------------------------------

MODULE = '''\
import os


class Store:
    def __init__(self, root):
        self.root = root

    def load(
        self,
        name,
    ):
        path = os.path.join(self.root, name)

        return open(path).read()


def main():
    print(Store("."))
x = 1
'''


@pytest.mark.parametrize(
    "needle, expected_first_line, expected_last_line",
    [
        ("self.root = root", "    def __init__(self, root):", "        self.root = root"),
        ("path = os", "    def load(", "        return open(path).read()"),
        ("        name,", "    def load(", "        return open(path).read()"),
        ("def load", "    def load(", "        return open(path).read()"),
        ("\n\n    def load", "class Store:", "        return open(path).read()"),  # blank line in class
        ("print(Store", "def main():", '    print(Store("."))'),
        ("    ):", "    def load(", "        return open(path).read()"),  # signature's closing line
        ("\n\n        return", "    def load(", "        return open(path).read()"),  # blank line in a body
    ],
)
def test_enclosing_block(needle, expected_first_line, expected_last_line):
    start, end = enclosing_block(MODULE, MODULE.index(needle) + 1)
    block = MODULE[start:end]
    assert block.split("\n")[0] == expected_first_line
    assert block.split("\n")[-1] == expected_last_line
    assert MODULE[start - 1] == "\n" and MODULE[end] == "\n"


def test_enclosing_block_outside_any_def_is_whole_text():
    assert enclosing_block(MODULE, MODULE.index("import")) == (0, len(MODULE))
    assert enclosing_block(MODULE, MODULE.index("x = 1")) == (0, len(MODULE))
    assert enclosing_block(MODULE, MODULE.index("\n\n\nclass") + 1) == (0, len(MODULE))  # blank, top level
    assert enclosing_block(MODULE, len(MODULE)) == (0, len(MODULE))


def test_huge_document_request_and_block_are_fast():
    body = "    total = total + compute(alpha, beta, gamma)  # accumulate\n"
    text = "def run():\n" + body * (4_000_000 // len(body)) + "\n\ndef other():\n    pass\n"
    cursor = text.index("\n", len(text) // 2)
    started = time.perf_counter()
    request = build_request(text, cursor, words, Settings())
    start, end = enclosing_block(text, cursor)
    assert time.perf_counter() - started < 1.0
    assert request.multiline is False and request.prefix.endswith("# accumulate")
    assert (start, text[end:]) == (0, "\n\n\ndef other():\n    pass\n")


def test_enclosing_block_then_holes():
    start, end = enclosing_block(HOLEY, HOLEY.index("pass"))
    assert HOLEY[start:end] == "def scale(v, k):\n    pass  # TODO"
    assert marked(HOLEY, find_holes(HOLEY, start, end, MARKERS)) == ["pass  # TODO"]


# --- canvas ----------------------------------------------------------------------


def test_fill_canvas_segments():
    text = "import os\n\ndef f(x):\n    a = ...\n    ...\n    return ...\n\nprint(f(1))\n"
    holes = [Hole(text.index("...\n    return"), text.index("...\n    return") + 3)]
    holes.append(Hole(text.index("return ...") + 7, text.index("return ...") + 10))
    canvas = fill_canvas(text, holes, chars, 8, 26, 6)
    assert canvas == HoleCanvas(
        segments=["def f(x):\n    a = ...\n    ", "\n    return ", "\n"],
        hole_tokens=[8, 8],
    )
    canvas = fill_canvas(text, holes, chars, [4, 6], 1000, 1000)
    assert canvas.segments == [text[: holes[0].start], "\n    return ", "\n\nprint(f(1))\n"]
    assert canvas.hole_tokens == [4, 6]


def test_fill_canvas_rejects_bad_holes():
    text = "abcdef"
    with pytest.raises(ValueError):
        fill_canvas(text, [], chars, 4, 10, 10)
    with pytest.raises(ValueError):
        fill_canvas(text, [Hole(3, 5), Hole(1, 2)], chars, 4, 10, 10)
    with pytest.raises(ValueError):
        fill_canvas(text, [Hole(1, 2)], chars, [4, 4], 10, 10)
