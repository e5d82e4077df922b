"""Document -> what the model fills: context windows, hole sizes, marker holes, canvases.

Pure: positions are character offsets into a ``str`` (the server converts LSP
positions first); token counts come from an ``encode`` callable passed in.
The heuristics are line- and indentation-based, tuned for Python, tolerant of
C-like braces.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

Encode = Callable[[str], Sequence[int]]

# No token covers more characters than this: windows slice this many chars per
# token of budget before encoding anything, so a 4 MB document costs nothing.
MAX_CHARS_PER_TOKEN = 16


@dataclass(frozen=True)
class InfillRequest:
    prefix: str
    suffix: str
    hole_tokens: int
    multiline: bool
    cursor: int  # offset in the original document


@dataclass(frozen=True)
class Hole:
    start: int  # offsets of the marker text the model replaces
    end: int


@dataclass
class HoleCanvas:
    """``encode(segments[0]) + [MASK] * hole_tokens[0] + encode(segments[1]) + ...``"""

    segments: list[str]  # len(hole_tokens) + 1; the outer two are windowed to the budgets
    hole_tokens: list[int]


class HoleSizes(Protocol):
    """The fields of ``settings.Settings`` that ``build_request`` reads."""

    prefix_tokens: int
    suffix_tokens: int
    single_line_tokens: int
    multi_line_tokens: int
    block_tokens: int


# --- lines ----------------------------------------------------------------------


def indent_width(line: str) -> int:
    """Columns of leading whitespace; tabs advance to multiples of 8, as in Python."""
    body = line.lstrip(" \t")
    return len(line[: len(line) - len(body)].expandtabs(8))


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else end


def _code_part(line: str) -> str:
    """``line`` cut before its ``#`` comment, string contents replaced by ``_``."""
    out = []
    quote = ""
    escaped = False
    for ch in line:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
                out.append(ch)
                continue
            out.append("_")
        elif ch == "#":
            break
        else:
            if ch in "'\"":
                quote = ch
            out.append(ch)
    return "".join(out)


def _net_brackets(code: str) -> int:
    return sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")


_LAMBDA_COLON = re.compile(r"\blambda\b[^:]*:$")
_WORD_OPENER = re.compile(r"\b(do|then)$")


def is_block_opener(line_before_cursor: str) -> bool:
    """Does the line so far open a block: ``if x:``, ``{``, ``(``, ``[``, ``=>``, ``do``, ``then``?

    A ``:`` counts only outside brackets (``d[1:`` is a slice) and not after ``lambda``.
    ``->`` does not count: in Python it starts a return annotation.
    """
    code = _code_part(line_before_cursor)
    variants = [code, code.split("//", 1)[0]] if "//" in code else [code]  # C-like comments
    for variant in variants:
        variant = variant.rstrip()
        if variant.endswith(("{", "(", "[", "=>")) or _WORD_OPENER.search(variant):
            return True
        if variant.endswith(":") and _net_brackets(variant) == 0 and not _LAMBDA_COLON.search(variant):
            return True
    return False


def _code_line_above(text: str, line_start: int) -> str | None:
    """The nearest non-blank line above the line starting at ``line_start``."""
    while line_start > 0:
        start = text.rfind("\n", 0, line_start - 1) + 1
        line = text[start : line_start - 1]
        if line.strip():
            return line
        line_start = start
    return None


def _code_line_below(text: str, line_end: int) -> str | None:
    """The nearest non-blank line below the line ending at ``line_end``."""
    while line_end < len(text):
        end = _line_end(text, line_end + 1)
        line = text[line_end + 1 : end]
        if line.strip():
            return line
        line_end = end
    return None


def wants_multiline(text: str, cursor: int) -> bool:
    """Should the suggestion span lines?

    Yes after a block opener with nothing after the cursor, and on a blank line
    that starts a body (the line above opens a block) or ends one (the next code
    line is dedented below the cursor, or there is none).
    """
    line_start = text.rfind("\n", 0, cursor) + 1
    line_end = _line_end(text, cursor)
    before = text[line_start:cursor]
    if text[cursor:line_end].strip():
        return False
    if before.strip():
        return is_block_opener(before)
    above = _code_line_above(text, line_start)
    if above is not None and is_block_opener(above):
        return True
    below = _code_line_below(text, line_end)
    return below is None or indent_width(below) < indent_width(before)


# --- windows --------------------------------------------------------------------


def _prefix_window(text: str, end: int, encode: Encode, budget: int) -> str:
    """Text before ``end``: its own line whole, then whole lines above while they fit ``budget``."""
    cap = max(budget, 1) * MAX_CHARS_PER_TOKEN
    floor = max(0, end - cap)
    newline = text.rfind("\n", floor, end)
    if newline < 0:
        return text[floor:end]  # first line of the document, or an absurdly long line
    head = text[newline + 1 : end]
    left = budget - len(encode(head))
    lo = max(0, newline + 1 - cap)
    lines = [piece + "\n" for piece in text[lo:newline].split("\n")]
    if lo > 0 and text[lo - 1] != "\n":
        lines = lines[1:]  # partial line
    kept: list[str] = []
    for line in reversed(lines):
        cost = len(encode(line))
        if cost > left:
            break
        left -= cost
        kept.append(line)
    kept.reverse()
    prefix = "".join(kept) + head
    while kept and len(encode(prefix)) > budget:  # line-by-line counts can undercount merges
        prefix = prefix[len(kept.pop(0)) :]
    return prefix


def _suffix_window(text: str, start: int, encode: Encode, budget: int) -> str:
    """Text after ``start``: the rest of its line whole, then whole lines below while they fit."""
    cap = max(budget, 1) * MAX_CHARS_PER_TOKEN
    ceiling = min(len(text), start + cap)
    newline = text.find("\n", start, ceiling)
    if newline < 0:
        return text[start:ceiling]  # last line of the document, or an absurdly long line
    tail = text[start:newline]
    left = budget - len(encode(tail))
    hi = min(len(text), newline + cap)
    lines = ["\n" + piece for piece in text[newline + 1 : hi].split("\n")]
    if hi < len(text) and text[hi] != "\n":
        lines = lines[:-1]  # partial line
    kept: list[str] = []
    for line in lines:
        cost = len(encode(line))
        if cost > left:
            break
        left -= cost
        kept.append(line)
    suffix = tail + "".join(kept)
    while kept and len(encode(suffix)) > budget:
        suffix = suffix[: -len(kept.pop())]
    return suffix


def window(text: str, cursor: int, encode: Encode, prefix_tokens: int, suffix_tokens: int) -> tuple[str, str]:
    """(prefix, suffix) around ``cursor`` within the token budgets, snapped to whole lines.

    The cursor's own line is always kept whole on both sides, even over budget.
    """
    _check_offset(text, cursor)
    return _prefix_window(text, cursor, encode, prefix_tokens), _suffix_window(text, cursor, encode, suffix_tokens)


def _check_offset(text: str, offset: int) -> None:
    if not 0 <= offset <= len(text):
        raise ValueError(f"offset {offset} outside document of {len(text)} characters")


def build_request(text: str, cursor: int, encode: Encode, sizes: HoleSizes, *, block: bool = False) -> InfillRequest:
    """The infill for a suggestion at ``cursor``; ``block=True`` for the "complete block" command."""
    multiline = block or wants_multiline(text, cursor)
    if block:
        hole_tokens = sizes.block_tokens
    elif multiline:
        hole_tokens = sizes.multi_line_tokens
    else:
        hole_tokens = sizes.single_line_tokens
    prefix, suffix = window(text, cursor, encode, sizes.prefix_tokens, sizes.suffix_tokens)
    return InfillRequest(prefix=prefix, suffix=suffix, hole_tokens=hole_tokens, multiline=multiline, cursor=cursor)


def refine_request(
    text: str, start: int, end: int, encode: Encode, prefix_tokens: int, suffix_tokens: int
) -> tuple[str, str, str]:
    """(prefix, selected text, suffix) for re-denoising ``text[start:end]``."""
    _check_offset(text, start)
    _check_offset(text, end)
    if start > end:
        raise ValueError(f"selection start {start} after end {end}")
    return (
        _prefix_window(text, start, encode, prefix_tokens),
        text[start:end],
        _suffix_window(text, end, encode, suffix_tokens),
    )


# --- holes ----------------------------------------------------------------------

_BLOCK_HEADER = re.compile(r"\s*(async\s+def|def|class|if|elif|else|for|while|with|try|except|finally|match|case)\b")


def _ellipsis_hole(line: str, offset: int) -> Hole | None:
    """``...`` as a whole statement: alone on its line, or the body of ``def f(): ...``."""
    code = _code_part(line).rstrip()
    if not code.endswith("..."):
        return None
    head = code[:-3]
    is_statement = not head.strip()
    is_inline_body = head.rstrip().endswith(":") and _BLOCK_HEADER.match(head) and _net_brackets(head) == 0
    if is_statement or is_inline_body:
        return Hole(offset + len(head), offset + len(code))
    return None


def _marker_holes(line: str, offset: int, marker: str) -> list[Hole]:
    if not marker:
        return []
    if marker == "...":
        hole = _ellipsis_hole(line, offset)
        return [hole] if hole else []
    if "#" in marker:
        # A comment marker must start the statement; the rest of its comment belongs to it.
        body = line.lstrip()
        if not body.startswith(marker):
            return []
        start = offset + len(line) - len(body)
        return [Hole(start, offset + len(line.rstrip()))]
    holes = []
    at = line.find(marker)
    while at >= 0:
        holes.append(Hole(offset + at, offset + at + len(marker)))
        at = line.find(marker, at + len(marker))
    return holes


def find_holes(text: str, start: int, end: int, markers: Sequence[str]) -> list[Hole]:
    """Marker holes starting inside ``[start, end)``, in order, without overlaps.

    ``...`` counts only as a whole statement (not ``x[...]``, ``"..."``, ``x = ...``);
    a marker with a ``#`` must start its line and takes the rest of the comment;
    any other marker counts wherever it occurs. Markers are single-line.
    """
    found: list[Hole] = []
    end = min(end, len(text))
    pos = text.rfind("\n", 0, start) + 1
    while pos < end:
        line_end = _line_end(text, pos)
        line = text[pos:line_end]
        for marker in markers:
            found.extend(h for h in _marker_holes(line, pos, marker) if start <= h.start < end)
        pos = line_end + 1
    holes: list[Hole] = []
    for hole in sorted(found, key=lambda h: (h.start, -h.end)):
        if not holes or hole.start >= holes[-1].end:
            holes.append(hole)
    return holes


_DEF_LINE = re.compile(r"[ \t]*(async[ \t]+)?(def|class)\b")


def _block_end(text: str, header_start: int, header_indent: int) -> int:
    """End (after the last non-blank character) of the def/class starting at ``header_start``."""
    pos, depth = header_start, 0
    while True:  # the header, including continuation lines inside brackets
        line_end = _line_end(text, pos)
        depth += _net_brackets(_code_part(text[pos:line_end]))
        if depth <= 0 or line_end == len(text):
            break
        pos = line_end + 1
    block_end = pos + len(text[pos:line_end].rstrip())
    while line_end < len(text):
        pos = line_end + 1
        line_end = _line_end(text, pos)
        line = text[pos:line_end]
        if line.strip():
            if indent_width(line) <= header_indent:
                break
            block_end = pos + len(line.rstrip())
    return block_end


def enclosing_block(text: str, offset: int) -> tuple[int, int]:
    """(start, end) of the innermost ``def``/``class`` whose lines contain ``offset``; the whole
    text if none. A blank line belongs to a block only if the next code line does."""
    _check_offset(text, offset)
    pos = text.rfind("\n", 0, offset) + 1
    line_end = _line_end(text, pos)
    limit: int | None = None  # a container must be indented less than this
    if not text[pos:line_end].strip():
        below = _code_line_below(text, line_end)
        limit = indent_width(below) if below is not None else 0
    while limit != 0:
        line = text[pos : _line_end(text, pos)]
        # Lines opening with a closer (the "):" of a long signature) continue the line above.
        if line.strip() and line.lstrip()[0] not in ")]}":
            indent = indent_width(line)
            if limit is None or indent < limit:
                if _DEF_LINE.match(line):
                    return pos, _block_end(text, pos, indent)
                limit = indent
        if pos == 0:
            break
        pos = text.rfind("\n", 0, pos - 1) + 1
    return 0, len(text)


def fill_canvas(
    text: str,
    holes: Sequence[Hole],
    encode: Encode,
    tokens_per_hole: int | Sequence[int],
    prefix_tokens: int,
    suffix_tokens: int,
) -> HoleCanvas:
    """The text around ``holes`` (sorted, disjoint); the outer pieces windowed to the budgets."""
    if not holes:
        raise ValueError("fill_canvas needs at least one hole")
    for left, right in zip(holes, holes[1:]):
        if right.start < left.end:
            raise ValueError(f"holes must be sorted and disjoint: {left} then {right}")
    _check_offset(text, holes[0].start)
    _check_offset(text, holes[-1].end)
    if isinstance(tokens_per_hole, int):
        hole_tokens = [tokens_per_hole] * len(holes)
    else:
        hole_tokens = list(tokens_per_hole)
        if len(hole_tokens) != len(holes):
            raise ValueError(f"{len(hole_tokens)} hole sizes for {len(holes)} holes")
    segments = [_prefix_window(text, holes[0].start, encode, prefix_tokens)]
    segments += [text[left.end : right.start] for left, right in zip(holes, holes[1:])]
    segments.append(_suffix_window(text, holes[-1].end, encode, suffix_tokens))
    return HoleCanvas(segments=segments, hole_tokens=hole_tokens)


def holes_in_range(text: str, start: int, end: int, markers: Sequence[str]) -> list[Hole]:
    """The holes in [start, end), or in the enclosing def/class when the range is empty: what
    ``fill holes`` fills (the server's code action and the job itself ask this one function)."""
    if start == end:
        start, end = enclosing_block(text, start)
    return find_holes(text, start, end, markers)
