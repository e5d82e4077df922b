"""Warm start: the previous job's canvas as a draft for the next one (pure functions, no torch).

A suggest job leaves its hole behind as a :class:`Canvas`: the hole's token ids (the mask id where
a cancelled job had not revealed them yet), where the hole began in the document and the text on
either side. When the user types and the next job for the same document starts near the same
place, :func:`align` lines the old hole up with the new one:

- the characters between the old hole's start and the new one's (what was typed) are consumed
  token by token where they agree with the draft: those tokens are now document text;
- at the first token they disagree with (or only partly cover, or a mask or EOS/pad meets a
  typed character), that token and the `window` tokens after it are re-masked;
- the draft tokens beyond stay in the new hole as *provisional* tokens: the sampler scores them
  like any other each forward and re-masks those the new context no longer supports
  (:func:`diffu_lsp.sampler.denoise`, ``provisional``).

No draft is used (None) when the text before the old hole or after the old cursor changed, when
the new hole starts before the old one, or when the typing ran past the whole draft.

While a command runs, :func:`draft_text` is its holes' text so far (the streamed draft its
progress shows).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Callable

CONTEXT_CHARS = 64   # text kept on each side of a hole to recognise the same place
CONFLICT_WINDOW = 3  # draft tokens re-masked after the first token the typing disagrees with
KEPT_DOCUMENTS = 64  # canvases a store keeps (least recently used ones go first)
HIDDEN = "…"         # how a run of still-masked positions shows in a streamed draft


@dataclasses.dataclass(frozen=True)
class Canvas:
    """The hole a suggest job left (finished, or partial when cancelled)."""

    ids: tuple[int, ...]  # the hole's tokens; mask_id where still masked
    start: int            # document offset where the hole's text begins
    cursor: int           # the job's cursor (start plus the blanks the hole began with)
    before: str           # up to CONTEXT_CHARS of document text before `start`
    after: str            # up to CONTEXT_CHARS of document text from `cursor`


@dataclasses.dataclass(frozen=True)
class Aligned:
    """The new hole's starting tokens: `ids` (mask_id where masked) and which are provisional."""

    ids: list[int]
    provisional: list[bool]
    consumed: int          # draft tokens the typing agreed with (now document text)
    remasked: int          # draft tokens re-masked at the conflict (0: the typing agreed throughout)


def canvas_of(text: str, start: int, cursor: int, ids) -> Canvas:
    return Canvas(tuple(int(i) for i in ids), start, cursor, text[max(0, start - CONTEXT_CHARS):start],
                  text[cursor:cursor + CONTEXT_CHARS])


def align(previous: Canvas | None, text: str, start: int, cursor: int, length: int, *, mask_id: int,
          piece: Callable[[int], str], stop_ids=(), window: int = CONFLICT_WINDOW) -> Aligned | None:
    """The draft for a new hole of `length` tokens that begins at `start` of `text` (cursor at
    `cursor`), from the `previous` job's canvas; `piece(id)` is a token's text. None: no usable draft."""
    if previous is None or start < previous.start:
        return None
    if text[max(0, previous.start - CONTEXT_CHARS):previous.start] != previous.before:
        return None
    if text[cursor:cursor + CONTEXT_CHARS] != previous.after:
        return None
    typed = text[previous.start:start]
    ids = list(previous.ids)
    at, conflict = 0, False
    while typed:
        if at == len(ids):
            return None  # typed past the end of the draft: nothing of it is left
        token = ids[at]
        text_of = "" if token == mask_id or token in stop_ids else piece(token)
        if text_of and "\ufffd" not in text_of and typed.startswith(text_of):
            typed = typed[len(text_of):]
            at += 1
            continue
        conflict = True  # disagrees, covers the token only in part, or meets a mask or EOS/pad
        break
    kept = ids[at:]
    remasked = 0
    if conflict:
        end = min(len(kept), 1 + window)
        remasked = sum(1 for t in kept[:end] if t != mask_id)
        kept[:end] = [mask_id] * end
    kept = kept[:length] + [mask_id] * max(0, length - len(kept))
    if all(t == mask_id for t in kept):
        return None
    return Aligned(kept, [t != mask_id for t in kept], at, remasked)


def draft_text(ids, *, mask_id: int, decode: Callable[[list[int]], str], stop_ids=(), hidden: str = HIDDEN) -> str:
    """A hole's text so far, for showing while it is denoised: the revealed tokens decoded, each
    run of still-masked positions shown as `hidden`; the text ends at the first EOS/pad."""
    pieces, run, in_mask = [], [], False
    for token in ids:
        if token in stop_ids:
            break
        if token == mask_id:
            if run:
                pieces.append(decode(run))
                run = []
            if not in_mask:
                pieces.append(hidden)
            in_mask = True
        else:
            run.append(token)
            in_mask = False
    if run:
        pieces.append(decode(run))
    return "".join(pieces)


class CanvasStore:
    """The last canvas per document key, for the engine that runs the jobs (bounded; a cluster
    replica runs several jobs at once, hence the lock)."""

    def __init__(self, limit: int = KEPT_DOCUMENTS):
        self.limit = limit
        self.canvases: OrderedDict[str, Canvas] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str) -> Canvas | None:
        with self.lock:
            return self.canvases.get(key)

    def put(self, key: str, canvas: Canvas) -> None:
        with self.lock:
            self.canvases[key] = canvas
            self.canvases.move_to_end(key)
            while len(self.canvases) > self.limit:
                self.canvases.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.canvases.clear()
