"""Next-edit prediction, the plain part: what an edit was, and where it may imply another.

After an edit settles, the server compares the document with its text at the last settle
(:func:`edit_between`), finds the places the edit may imply a change at (:func:`candidates`):
(a) the other occurrences of the text it removed (in the enclosing def when the edit is inside
one), (b) the lines shaped like the edited line before the edit (same leading name), at the place
that corresponds to the edit, (c) the call sites of a def whose parameters it changed; and hands them to the job path as one ``next_edit`` request, where
they are masked and denoised together in one canvas (``features.next_edit``; with a model that
edits, the rest of the candidates' lines goes in as provisional tokens it may replace). Predictions that
survive are kept per document and moved along with later edits (:func:`follow`), or withdrawn when
the text under them changes. Pure: no pygls, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from . import infill

MAX_CANDIDATES = 8  # spans one next-edit canvas denoises (nearest the edit first)
MAX_EDIT_CHARS = 200  # a larger edit (a paste, a block deleted) implies nothing we look for
WINDOW_CHARS = 3000  # candidates lie within this many characters of the edit (one canvas of a few thousand tokens)
SIBLING_LINES = 12  # lines above and below the edit searched for lines shaped like it
_WORD = re.compile(r"\w")
_LEADING_NAME = re.compile(r"\s*([A-Za-z_][\w.]*)")


@dataclass(frozen=True)
class Edit:
    """``removed`` (from the text before) became ``introduced`` at ``start``..``end`` of the text after."""

    start: int
    end: int
    removed: str
    introduced: str
    old_line: str  # the edited line(s) as they were before the edit


@dataclass(frozen=True)
class Candidate:
    """A span ``start``..``end`` of the text after the edit that the edit may imply a change at;
    ``guess`` is the plain text replacement (sizes the mask); ``prior``: how sure the edit alone
    makes it (1 for a use of a name whose binding the edit renamed, which no longer has one)."""

    start: int
    end: int
    guess: str
    prior: float = 0.0


@dataclass(frozen=True)
class Prediction:
    """``text`` for ``start``..``end`` (offsets in the document text it was predicted for);
    ``old`` is the text it replaces, checked before it is shown or applied."""

    start: int
    end: int
    old: str
    text: str


def _is_word(ch: str) -> bool:
    return bool(ch) and bool(_WORD.match(ch))


def _common_ends(before: str, after: str) -> tuple[int, int]:
    """Lengths of the longest common prefix and, of the rest, the longest common suffix."""
    limit, step = min(len(before), len(after)), 4096  # compared a block at a time first: a keystroke in a big file
    head = 0
    while head + step <= limit and before[head:head + step] == after[head:head + step]:
        head += step
    while head < limit and before[head] == after[head]:
        head += 1
    tail, nb, na = 0, len(before), len(after)
    while tail + step <= limit - head and before[nb - tail - step:nb - tail] == after[na - tail - step:na - tail]:
        tail += step
    while tail < limit - head and before[nb - 1 - tail] == after[na - 1 - tail]:
        tail += 1
    return head, tail


def edit_between(before: str, after: str) -> Edit | None:
    """The one changed region between two texts (common prefix and suffix cut off), widened to
    whole words; None when nothing changed or the change is too large to imply anything."""
    if before == after:
        return None
    head, tail = _common_ends(before, after)
    # widen to whole words: "co|un|t" -> "count" (while the changed part touches a word on that side)
    def inner(at_before: int, at_after: int) -> bool:
        return (head <= at_before < len(before) - tail and _is_word(before[at_before])) or (
            head <= at_after < len(after) - tail and _is_word(after[at_after]))

    while head > 0 and _is_word(before[head - 1]) and inner(head, head):
        head -= 1
    while tail > 0 and _is_word(before[len(before) - tail]) and inner(len(before) - tail - 1, len(after) - tail - 1):
        tail -= 1
    removed, introduced = before[head:len(before) - tail], after[head:len(after) - tail]
    if max(len(removed), len(introduced)) > MAX_EDIT_CHARS:
        return None
    line_start = before.rfind("\n", 0, head) + 1
    line_end = before.find("\n", len(before) - tail)
    old_line = before[line_start:len(before) if line_end < 0 else line_end]
    return Edit(head, len(after) - tail, removed, introduced, old_line)


def _occurrences(text: str, word: str, start: int, end: int, *, code_only: bool = False) -> list[int]:
    """Offsets of ``word`` in text[start:end], whole words only where it starts/ends with one;
    ``code_only``: not in a string or comment, and not an attribute (``.word``)."""
    found, at = [], text.find(word, start, end)
    while at >= 0:
        before_ok = not (_is_word(word[0]) and at > 0 and _is_word(text[at - 1]))
        after_ok = not (_is_word(word[-1]) and _is_word(text[at + len(word):at + len(word) + 1]))
        if before_ok and after_ok and (not code_only or _in_code(text, at, word)):
            found.append(at)
        at = text.find(word, at + len(word), end)
    return found


def _in_code(text: str, at: int, word: str) -> bool:
    line_start = text.rfind("\n", 0, at) + 1
    code = infill._code_part(_line_at(text, at))
    column = at - line_start
    return code[column:column + len(word)] == word and text[at - 1:at] != "."


def _binds(text: str, name: str) -> bool:
    """Whether ``text`` (code) binds ``name``: an assignment, a for/with/import/def/class target, a parameter."""
    n = re.escape(name)
    patterns = (rf"(?<![\w.]){n}\s*(?::[^=\n]*)?=(?!=)", rf"\b(?:for|as|import|def|class|global|nonlocal)\s+{n}\b",
                rf"\bfor\s+[\w\s,()]*\b{n}\b[^\n]*\bin\b", rf"\bdef\s+\w+\s*\([^)]*(?<![\w.]){n}\b")
    code = "\n".join(infill._code_part(line) for line in text.split("\n"))
    return any(re.search(p, code) for p in patterns)


def renamed_binding(text: str, edit: Edit, start: int, end: int) -> bool:
    """The edit renamed a name where it is bound (``count = 0`` -> ``total = 0``), and text[start:end]
    (its scope, after the edit) binds the old name nowhere else: its other uses there are now dangling."""
    old, new = edit.removed.strip(), edit.introduced.strip()
    if not (old.isidentifier() and new.isidentifier()):
        return False
    return _binds(edit.old_line, old) and _binds(_line_at(text, edit.start), new) and not _binds(text[start:end], old)


def _lines_around(text: str, offset: int, count: int) -> list[tuple[int, str]]:
    """(start, line) of up to ``count`` lines above and below the line of ``offset`` (not it)."""
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    here = max(i for i, s in enumerate(starts) if s <= offset)
    out = []
    for i in range(max(0, here - count), min(len(starts), here + count + 1)):
        if i != here:
            end = text.find("\n", starts[i])
            out.append((starts[i], text[starts[i]:len(text) if end < 0 else end]))
    return out


def _line_at(text: str, offset: int) -> str:
    end = text.find("\n", offset)
    return text[text.rfind("\n", 0, offset) + 1:len(text) if end < 0 else end]


def _leading_name(line: str) -> str | None:
    m = _LEADING_NAME.match(line)
    return m.group(1) if m else None


def _sibling_spans(text: str, edit: Edit) -> list[Candidate]:
    """(b) In the lines near the edit that start with the same name as the edited line did, the
    place that corresponds to the edit: the same text before it, or the same rest of the line after it."""
    old_line = edit.old_line
    if "\n" in old_line or "\n" in edit.removed or "\n" in edit.introduced:
        return []
    name = _leading_name(old_line)
    if name is None:
        return []
    line_start = text.rfind("\n", 0, edit.start) + 1
    at = edit.start - line_start  # the edit's column in the old line too: the text before it is unchanged
    before, after = old_line[:at], old_line[at + len(edit.removed):]
    out = []
    for start, line in _lines_around(text, edit.start, SIBLING_LINES):
        if _leading_name(line) != name or line.strip() == old_line.strip():
            continue
        if after.strip() and line.endswith(after) and line[:len(line) - len(after)].endswith(edit.removed):
            end = start + len(line) - len(after)
            out.append(Candidate(end - len(edit.removed), end, edit.introduced))
        elif before.strip() and line.startswith(before) and line[len(before):].startswith(edit.removed) and (
                len(before) > len(line) - len(line.lstrip()) + len(name)):
            out.append(Candidate(start + len(before), start + len(before) + len(edit.removed), edit.introduced))
    return out


_DEF_NAME = re.compile(r"\s*(?:async\s+)?def\s+(\w+)\s*\(")


def _closing_paren(text: str, open_at: int, limit: int = 2000) -> int | None:
    """Offset of the ``)`` matching the ``(`` at ``open_at`` (strings skipped roughly), or None."""
    depth, quote, i = 0, "", open_at
    while i < min(len(text), open_at + limit):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return i if ch == ")" else None
        i += 1
    return None


def _call_sites(text: str, edit: Edit) -> list[Candidate]:
    """(c) The edit changed the parameters of a ``def`` line: at each call of that function in the
    text, the place before its closing parenthesis, for what the call now needs."""
    m = _DEF_NAME.match(edit.old_line)
    line_start = text.rfind("\n", 0, edit.start) + 1
    if m is None or "\n" in edit.old_line or edit.start - line_start < m.end() or not edit.introduced.strip():
        return []
    name, out = m.group(1), []
    for call in re.finditer(rf"(?<![\w]){re.escape(name)}\s*\(", text):
        if _line_at(text, call.start()).lstrip().startswith(("def ", "async def ")) or not _in_code(text, call.start(), name):
            continue
        close = _closing_paren(text, call.end() - 1)
        if close is not None:
            empty = not text[call.end():close].strip()
            guess = edit.introduced.lstrip(", ") if empty else edit.introduced
            out.append(Candidate(close, close, guess))
    return out


def candidates(text: str, edit: Edit) -> list[Candidate]:
    """The spans of ``text`` (after ``edit``) where the edit may imply a change, nearest the edit
    first, at most :data:`MAX_CANDIDATES`, sorted by offset, disjoint and away from the edit."""
    found: dict[tuple[int, int], Candidate] = {}
    removed = edit.removed.strip()
    if removed and edit.introduced.strip() != removed and "\n" not in removed:
        lo, hi = 0, len(text)
        if not infill._DEF_LINE.match(_line_at(text, edit.start)):
            lo, hi = infill.enclosing_block(text, edit.start)  # a name inside a def: its other uses there
        introduced, prior = edit.introduced.strip(), float(renamed_binding(text, edit, lo, hi))
        for at in _occurrences(text, removed, lo, hi, code_only=True):
            found[(at, at + len(removed))] = Candidate(at, at + len(removed), introduced, prior)
    for candidate in _sibling_spans(text, edit) + _call_sites(text, edit):
        found.setdefault((candidate.start, candidate.end), candidate)
    spans = [c for c in found.values() if (c.end < edit.start or c.start > edit.end)
             and edit.start - WINDOW_CHARS <= c.start and c.end <= edit.end + WINDOW_CHARS]
    spans.sort(key=lambda c: min(abs(c.start - edit.end), abs(edit.start - c.end)))
    chosen: list[Candidate] = []
    for c in spans:
        if len(chosen) < MAX_CANDIDATES and all(c.end < o.start or c.start > o.end for o in chosen):
            chosen.append(c)
    return sorted(chosen, key=lambda c: c.start)


def plain_replacements(text: str, edit: Edit) -> list[Prediction]:
    """The baseline: every other whole-word occurrence of the removed text in the window replaced
    by the introduced text (what a search-and-replace would do); no model."""
    removed = edit.removed.strip()
    if not removed or "\n" in removed or edit.introduced.strip() == removed:
        return []
    return [Prediction(at, at + len(removed), removed, edit.introduced.strip())
            for at in _occurrences(text, removed, 0, len(text)) if not edit.start <= at < edit.end]


def follow(predictions: list[Prediction], before: str, after: str) -> list[Prediction]:
    """The predictions moved along with the change from ``before`` to ``after``: those before or
    after the changed region keep or shift their offsets; one the change touches is withdrawn. With
    none to move, nothing is compared: this runs on every keystroke, in documents of any size."""
    if not predictions or before == after:
        return predictions
    head, tail = _common_ends(before, after)
    changed_end, delta = len(before) - tail, len(after) - len(before)
    kept = []
    for p in predictions:
        if p.end < head:
            kept.append(p)
        elif p.start > changed_end:
            kept.append(Prediction(p.start + delta, p.end + delta, p.old, p.text))
    return [p for p in kept if after[p.start:p.end] == p.old]


def nearest_after(predictions: list[Prediction], offset: int) -> Prediction | None:
    """The first prediction that starts at or after ``offset``, else the first (wrapping around)."""
    ordered = sorted(predictions, key=lambda p: p.start)
    return next((p for p in ordered if p.start >= offset), ordered[0] if ordered else None)


MAX_PREDICTIONS = 5  # shown per document at once, nearest the edit first


@dataclass
class Document:
    """One document's next-edit state: its text at the last settle, the predictions shown (for
    ``text``), those the user rejected, and the last edit (to predict again after a rejection)."""

    settled: str
    text: str = ""
    predictions: list[Prediction] = field(default_factory=list)
    rejected: set[tuple[int, int, str]] = field(default_factory=set)  # (start, end, text) in ``text``
    edit: Edit | None = None
    edited: str = ""  # the text ``edit`` was found in (its offsets are into it)
    pending: Any = None  # the LSP layer's timer or task for the next settle


class Tracker:
    """Each open document's next-edit state, for one window."""

    def __init__(self) -> None:
        self.documents: dict[str, Document] = {}

    def opened(self, uri: str, text: str) -> None:
        self.documents[uri] = Document(settled=text, text=text)

    def changed(self, uri: str, text: str) -> bool:
        """The document is now ``text``: its predictions follow; True if any was withdrawn."""
        doc = self.documents.setdefault(uri, Document(settled=text, text=text))
        kept = follow(doc.predictions, doc.text, text)
        withdrawn = len(kept) != len(doc.predictions)
        if doc.rejected and text != doc.text:
            doc.rejected = {(p.start, p.end, p.text) for p in follow(
                [Prediction(s, e, doc.text[s:e], t) for s, e, t in doc.rejected], doc.text, text)}
        doc.predictions, doc.text = kept, text
        return withdrawn

    def settle(self, uri: str, text: str) -> Edit | None:
        """The edit since the last settle (None if none); ``text`` is the new settled text."""
        doc = self.documents.setdefault(uri, Document(settled=text, text=text))
        edit = edit_between(doc.settled, text)
        doc.settled = text
        if edit is not None:
            doc.edit, doc.edited = edit, text
        return edit

    def last_edit(self, uri: str, text: str) -> Edit | None:
        """The last edit found, if ``text`` is still the text it was found in."""
        doc = self.documents.get(uri)
        return doc.edit if doc is not None and doc.edited == text else None

    def candidates(self, uri: str, text: str, edit: Edit) -> list[Candidate]:
        """The edit's candidates, less the rejected predictions and the spans already predicted."""
        doc = self.documents.get(uri)
        skip = set() if doc is None else {(p.start, p.end) for p in doc.predictions}
        rejected = set() if doc is None else {(s, e) for s, e, _ in doc.rejected}
        return [c for c in candidates(text, edit) if (c.start, c.end) not in skip | rejected]

    def put(self, uri: str, text: str, new: list[Prediction]) -> list[Prediction]:
        """Predictions made for ``text`` join those still shown (unless the document moved on)."""
        doc = self.documents.get(uri)
        if doc is None or doc.text != text:
            return []
        rejected = doc.rejected
        fresh = [p for p in new if (p.start, p.end, p.text) not in rejected
                 and all(p.end <= o.start or p.start >= o.end for o in doc.predictions)]
        doc.predictions = sorted(doc.predictions + fresh, key=lambda p: p.start)
        return doc.predictions

    def shown(self, uri: str) -> list[Prediction]:
        doc = self.documents.get(uri)
        return list(doc.predictions) if doc is not None else []

    def reject(self, uri: str, start: int, end: int) -> Prediction | None:
        """Drop the prediction at start..end and never show it again for this text."""
        doc = self.documents.get(uri)
        if doc is None:
            return None
        hit = next((p for p in doc.predictions if p.start <= end and start <= p.end), None)
        if hit is not None:
            doc.predictions.remove(hit)
            doc.rejected.add((hit.start, hit.end, hit.text))
        return hit

    def forget(self, uri: str) -> Document | None:
        return self.documents.pop(uri, None)
