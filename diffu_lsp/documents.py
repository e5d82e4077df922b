"""Documents and positions: pygls's text documents with LSP's line breaks, and conversions
between client positions (UTF-16 or UTF-8 code units, as negotiated) and character offsets.
Everything below this module works with character offsets into plain text.
"""

from __future__ import annotations

import re

from lsprotocol import types as lsp
from pygls.workspace import TextDocument, Workspace

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_LSP_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")  # two UTF-16 code units
_NON_ASCII = re.compile(r"[^\x00-\x7f]")  # more than one UTF-8 code unit


class LspTextDocument(TextDocument):
    """pygls's TextDocument, with lines broken at LSP's line ends only (\\n, \\r\\n, \\r).

    pygls uses ``str.splitlines``, which also breaks at form feeds, \\x1c-\\x1e, \\x85 and
    U+2028/9: a position after such a character (the stdlib has form feeds) would land on
    the wrong line, and incremental edits there would corrupt the text."""

    @property
    def lines(self):
        return tuple(_LSP_LINE.findall(self.source))

    # pygls has no public hook for applying an edit: this overrides its private method (and sets
    # its private _source). pygls's splits the whole document into lines, walks them all, and
    # converts columns by summing a Python call per character of the line: 11 s per keystroke on
    # a 20 MB single-line file. Here the work in Python is one step per line break above the edit
    # and per wide character (astral in UTF-16, non-ASCII in UTF-8) before its column on its line.
    def _apply_incremental_change(self, change: lsp.TextDocumentContentChangePartial) -> None:
        source = self.source
        first, last = sorted((change.range.start, change.range.end), key=lambda p: (p.line, p.character))
        line_start = _line_start(source, first.line)
        start = self._offset(source, line_start, first.character)
        if last.line != first.line and line_start is not None:  # on from the first line
            line_start = _line_start(source, last.line - first.line, line_start)
        end = self._offset(source, line_start, last.character)
        self._source = source[:start] + change.text + source[end:]

    def _offset(self, source: str, start: int | None, units: int) -> int:
        """The character offset of a client column on the line starting at ``start`` (None: past
        the document's end, which is the answer), as LSP has it: a column past its line's end is
        that end; one inside a character of several code units is after it (as pygls has it)."""
        if start is None:
            return len(source)
        stop = start + units  # a code unit is never more than one character
        for line_break in "\r\n":
            if (at := source.find(line_break, start, stop)) >= 0:
                stop = at
        head = source[start:stop]
        encoding = self.position_codec.encoding
        if head.isascii() or encoding == lsp.PositionEncodingKind.Utf32:
            return start + len(head)
        wide = _NON_ASCII if encoding == lsp.PositionEncodingKind.Utf8 else _ASTRAL
        extra = 0  # code units beyond one per character, before the character at hand
        for char in wide.finditer(head):
            at = char.start()
            if at + extra >= units:
                break
            extra += self.position_codec.client_num_units(char.group()) - 1
            if at + 1 + extra >= units:
                return start + at + 1
        return start + min(units - extra, len(head))


class LspWorkspace(Workspace):
    # pygls has no public hook for the document class a workspace makes: this overrides its
    # private factory (and reads its private sync kind and position codec).
    def _create_text_document(self, doc_uri, source=None, version=None, language_id=None):
        return LspTextDocument(doc_uri, source=source, version=version, language_id=language_id,
                               sync_kind=self._sync_kind, position_codec=self._position_codec)


def _line_start(source: str, lines: int, start: int = 0) -> int | None:
    """The offset of the line ``lines`` below the one starting at ``start`` (None: past the end)."""
    if lines <= 0:
        return start
    for number, line_break in enumerate(_LINE_BREAK.finditer(source, start), 1):
        if number == lines:
            return line_break.end()
    return None


def offset_at(doc: TextDocument, position: lsp.Position, *, end_of_range: bool = False
              ) -> tuple[int, lsp.Position] | None:
    """Character offset of a client position and the client position of that offset (one
    inside a UTF-16 surrogate pair moves after the pair, so both agree). A column past a
    line's end is that end (LSP); a line past the document's end is None (a range's end
    there, ``end_of_range``, is the end of the document)."""
    lines = doc.lines
    last = len(lines) if not lines or lines[-1].endswith(("\n", "\r")) else len(lines) - 1
    if position.line > last:
        if not end_of_range:
            return None
        offset = len(doc.source)
        return offset, position_at(doc, [offset])[0]
    if position.line == len(lines):  # the empty line after a final line break
        return len(doc.source), lsp.Position(line=position.line, character=0)
    body = lines[position.line].rstrip("\r\n")
    codec = doc.position_codec
    width = codec.client_num_units(body)
    clamped = lsp.Position(line=position.line, character=min(position.character, width))
    column = codec.position_from_client_units(lines, clamped).character if body else 0
    return doc.offset_at_position(clamped), lsp.Position(line=position.line,
                                                         character=codec.client_num_units(body[:column]))


def position_at(doc: TextDocument, offsets: list[int]) -> list[lsp.Position]:
    """Client positions of character offsets (pygls's own helper is off by a line at the
    end of a document without a final newline)."""
    lines = doc.lines
    out = []
    for offset in offsets:
        start = 0
        for number, line in enumerate(lines):
            if offset < start + len(line):
                column = min(offset - start, len(line.rstrip("\r\n")))
                break
            start += len(line)
        else:
            if lines and not lines[-1].endswith(("\n", "\r")):
                number, column = len(lines) - 1, len(lines[-1])
            else:
                number, column = len(lines), 0
        out.append(doc.position_to_client_units(lsp.Position(line=number, character=column)))
    return out


def model_text(source: str) -> str | None:
    """The document's text as a model may read it: None for binary content (a NUL byte); a lone
    UTF-16 surrogate (no pair), which cannot be encoded or tokenized, becomes U+FFFD (one
    character for one, so offsets stay)."""
    if "\x00" in source:
        return None
    if not source.isascii():
        return _LONE_SURROGATE.sub("\ufffd", source)
    return source
