"""Positions: conversions between client positions (UTF-16 or UTF-8 code units, as negotiated) and character offsets.
Everything below this module works with character offsets into plain text. The document class
(LSP's line breaks, fast edits) is pygls_adapter.LspTextDocument: it overrides pygls internals.
"""

from __future__ import annotations

import re

from lsprotocol import types as lsp
from pygls.workspace import TextDocument

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


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
