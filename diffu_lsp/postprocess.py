"""Clean a model's fill before it reaches the editor.

Two stages: token filters on (ids, confidences) before decoding, then text
filters ``name(text, ctx) -> text`` run in order by ``postprocess_text``
(an empty result stops the pipeline).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from .infill import indent_width, is_block_opener

# --- token stage -----------------------------------------------------------------


def cut_at_stop(
    ids: Sequence[int], confidences: Sequence[float], stop_ids: Collection[int]
) -> tuple[list[int], list[float]]:
    """Keep the tokens before the first stop id (EOS, pad)."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return list(ids[:i]), list(confidences[:i])
    return list(ids), list(confidences)


def drop_low_confidence_tail(
    ids: Sequence[int], confidences: Sequence[float], threshold: float
) -> tuple[list[int], list[float]]:
    """Drop tokens from the end while their confidence is below ``threshold``."""
    end = len(ids)
    while end > 0 and confidences[end - 1] < threshold:
        end -= 1
    return list(ids[:end]), list(confidences[:end])


# --- text stage ------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    prefix: str  # document text before the cursor (windowed)
    suffix: str  # document text after the cursor (windowed)
    multiline: bool

    @property
    def line_before(self) -> str:
        """The cursor's line up to the cursor."""
        return self.prefix[self.prefix.rfind("\n") + 1 :]

    @property
    def line_after(self) -> str:
        """The cursor's line after the cursor."""
        return self.suffix.partition("\n")[0].rstrip("\r")


TextFilter = Callable[[str, Context], str]


def drop_whitespace_only(text: str, ctx: Context) -> str:
    return text if text.strip() else ""


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def cut_at_control_character(text: str, ctx: Context) -> str:
    """The text before its first control character (tab and line breaks excepted): a byte-level
    tokenizer can emit NUL, ESC and the like, which no one types into code and which an editor
    would insert as they are (a random-weight checkpoint suggested "\\x00filler..." in Neovim)."""
    found = _CONTROL.search(text)
    return text if found is None else text[:found.start()]


def first_line_only(text: str, ctx: Context) -> str:
    """Single-line mode: the first line. A fill that starts with a line break keeps the
    next code line, but only at the end of a line (it cannot split the cursor's line)."""
    if ctx.multiline:
        return text
    first, newline, rest = text.partition("\n")
    if first.strip() or not newline:
        return first.rstrip("\r")
    if ctx.line_after.strip():
        return ""
    for line in rest.split("\n"):
        if line.strip():
            return "\n" + line.rstrip("\r")
    return ""


def _closes_opener(line: str, opener_indent: int) -> bool:
    """A ``)``/``]``/``}`` line back at the opener's indentation ends the opened block."""
    return indent_width(line) == opener_indent and line.lstrip()[:1] in (")", "]", "}")


def limit_scope_by_indentation(text: str, ctx: Context) -> str:
    """Multi-line mode: stop at the first line that leaves the cursor's block.

    The block is what the cursor opens or sits in: after ``def f():`` lines must be
    indented deeper than the ``def`` (a closing bracket line at its indentation is
    kept and ends the fill); on a blank line, at least to the cursor's column. Later
    lines may not dedent below the first completed line either.
    """
    if not ctx.multiline:
        return text
    before = ctx.line_before
    lines = text.split("\n")
    opener = before.strip() != "" and is_block_opener(before)
    if before.strip():
        floor = indent_width(before) + (1 if opener else 0)
        kept, first = lines[:1], 1  # line 0 continues the cursor's line
    else:
        floor = indent_width(before)
        kept, first = [], 0
    body_indent: int | None = None
    for i in range(first, len(lines)):
        line = lines[i]
        if not line.strip():
            kept.append(line)
            continue
        indent = indent_width(before + line if i == 0 else line)
        if indent < (floor if body_indent is None else body_indent):
            if opener and _closes_opener(line, floor - 1):
                kept.append(line)
            break
        if body_indent is None:
            body_indent = indent
        kept.append(line)
    return "\n".join(kept)


def drop_suffix_duplicate(text: str, ctx: Context) -> str:
    """Drop the fill's last lines when they repeat the lines that follow the cursor.

    Lines compare stripped; the fill's final line may be a cut-off start of the
    suffix line. A fill that is just the start of the suffix becomes "".
    """
    if ctx.suffix.lstrip().startswith(text.strip()):
        return ""
    lines = text.split("\n")
    upcoming = [line.strip() for line in ctx.suffix.split("\n")[1:] if line.strip()]
    first = 1 if ctx.line_before.strip() else 0  # line 0 then continues the cursor's line
    for i in range(first, len(lines)):
        if not lines[i].strip():
            continue
        tail = [line.strip() for line in lines[i:] if line.strip()]
        n = len(tail)
        if n <= len(upcoming) and tail[:-1] == upcoming[: n - 1] and upcoming[n - 1].startswith(tail[-1]):
            return _drop_trailing_blank_lines("\n".join(lines[:i]))
    return text


_OPENER_OF = {")": "(", "]": "[", "}": "{"}


def _bracket_scan(prefix: str, text: str) -> tuple[int | None, set[int]]:
    """Scan ``prefix + text`` for brackets and strings (``#`` comments skipped).

    Returns where ``text`` first closes a bracket that is not open (or not the
    innermost), and the indices in ``text`` that close a bracket or string
    opened in ``prefix``.
    """
    source = prefix + text
    base = len(prefix)
    stack: list[tuple[str, int]] = []  # (opener, position)
    quote, quote_at = "", -1
    closes_prefix: set[int] = set()
    i = 0
    while i < len(source):
        ch = source[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if source.startswith(quote, i):
                if i >= base > quote_at:
                    closes_prefix.update(range(i - base, i - base + len(quote)))
                i += len(quote)
                quote = ""
                continue
            if ch == "\n" and len(quote) == 1:
                quote = ""  # unterminated one-line string
            i += 1
            continue
        if ch == "#":
            newline = source.find("\n", i)
            i = len(source) if newline < 0 else newline
            continue
        if ch in "'\"":
            quote = ch * 3 if source.startswith(ch * 3, i) else ch
            quote_at = i
            i += len(quote)
            continue
        if ch in "([{":
            stack.append((ch, i))
        elif ch in ")]}":
            if stack and stack[-1][0] == _OPENER_OF[ch]:
                _, opened_at = stack.pop()
                if i >= base > opened_at:
                    closes_prefix.add(i - base)
            elif i >= base:
                return i - base, closes_prefix
            # A stray closer in the prefix: its opener fell outside the window.
        i += 1
    return None, closes_prefix


def balance_brackets(text: str, ctx: Context) -> str:
    """Cut the fill where it closes a bracket that was never opened; then drop the
    closers at its end that the text after the cursor already supplies
    (``print(|)`` + ``"hi")`` -> ``"hi"``)."""
    cut, closes_prefix = _bracket_scan(ctx.prefix, text)
    if cut is not None:
        text = text[:cut].rstrip()
    body = text.rstrip()
    run_start = len(body)
    while run_start > 0 and run_start - 1 in closes_prefix:
        run_start -= 1
    run = body[run_start:]
    for m in range(len(run), 0, -1):
        if ctx.line_after.startswith(run[-m:]):
            return body[:-m]
    return text


def _drop_trailing_blank_lines(text: str) -> str:
    lines = text.split("\n")
    while len(lines) > 1 and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def trim_trailing_whitespace(text: str, ctx: Context) -> str:
    """Strip each line's trailing whitespace and drop trailing blank lines; the last line
    is left alone when text follows the cursor on its line (``a |+ b``)."""
    lines = text.split("\n")
    if ctx.line_after.strip():
        return "\n".join([line.rstrip() for line in lines[:-1]] + lines[-1:])
    return _drop_trailing_blank_lines("\n".join(line.rstrip() for line in lines))


DEFAULT_TEXT_FILTERS: tuple[TextFilter, ...] = (
    drop_whitespace_only,
    cut_at_control_character,
    first_line_only,
    limit_scope_by_indentation,
    balance_brackets,
    drop_suffix_duplicate,
    trim_trailing_whitespace,
    drop_whitespace_only,
)


def postprocess_text(text: str, ctx: Context, filters: Sequence[TextFilter] = DEFAULT_TEXT_FILTERS) -> str:
    """Run ``filters`` in order; stop at the first empty result."""
    for text_filter in filters:
        text = text_filter(text, ctx)
        if not text:
            return ""
    return text


# --- inline item range -------------------------------------------------------------


def _closers_from_before(line: str, quote: str = "") -> tuple[set[int], str]:
    """Indices in ``line`` that close a bracket or string opened before it (starting
    inside ``quote`` when given), and the quote still open at its end."""
    closers: set[int] = set()
    stack: list[str] = []
    opened_before = bool(quote)
    escaped = False
    for i, ch in enumerate(line):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                if opened_before:
                    closers.add(i)
                quote, opened_before = "", False
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in ")]}":
            if stack and stack[-1] == _OPENER_OF[ch]:
                stack.pop()
            elif not stack:
                closers.add(i)
    return closers, quote


def _is_subsequence(needle: str, haystack: str) -> bool:
    chars = iter(haystack)
    return all(ch in chars for ch in needle)


def auto_closed_tail(line_after_cursor: str, completion: str) -> int:
    """How many characters at the start of ``line_after_cursor`` (closers, quotes, ``:``)
    the completion's last line already types at its end, so the inline item can
    replace them: ``print(|)`` + ``"hi")`` -> 1; ``print(|)`` + ``f(x)`` -> 0."""
    line = completion.rpartition("\n")[2].rstrip()
    closers, still_open = _closers_from_before(line)
    if still_open:  # odd quotes: the fill started inside a string
        closers, _ = _closers_from_before(line, still_open)
    start = len(line)
    while start > 0 and (start - 1 in closers or line[start - 1] == ":"):
        start -= 1
    run = line[start:]
    for m in range(min(len(run), len(line_after_cursor)), 0, -1):
        if _is_subsequence(line_after_cursor[:m], run):
            return m
    return 0
