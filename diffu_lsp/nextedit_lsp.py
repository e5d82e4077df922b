"""Next-edit predictions in LSP terms (the LSP layer, beside server.py).

After each change the document's predictions follow the text (or are withdrawn) and a timer
starts; when it runs out (setting ``nextEditDelayMs``) with no newer change, the session predicts
(diffu_lsp/session.py, diffu_lsp/nextedit.py) and each prediction is published as a Hint
diagnostic (source ``diffu``) with a quick fix that applies it. ``diffu.nextEdit`` answers the
nearest prediction after a position; ``diffu.rejectNextEdit`` drops one and predicts again.
server.py's handlers call the functions here, a line each.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from lsprotocol import types as lsp
from pygls.exceptions import JsonRpcInvalidParams

from .documents import offset_at, position_at
from .errors import JobCancelled, RequestTooLarge
from .session import PREEMPTED
from .nextedit import Prediction, nearest_after

log = logging.getLogger("diffu_lsp.nextedit")

CMD_NEXT_EDIT = "diffu.nextEdit"
CMD_REJECT_NEXT_EDIT = "diffu.rejectNextEdit"
SOURCE = "diffu"
CODE = "next-edit"


def message(p: Prediction) -> str:
    if not p.old:
        return f"next edit: insert {p.text!r}"
    return f"next edit: {p.old} → {p.text}" if "\n" not in p.old else f"next edit: → {p.text}"


def opened(ls, uri: str) -> None:
    snap = ls.snapshot(uri)
    if snap is not None:
        ls.session.next_edits.opened(uri, snap[1])


def changed(ls, uri: str) -> None:
    """A didChange: predictions follow the text (withdrawn where it changed under them), and
    the timer for the next prediction starts again."""
    snap = ls.snapshot(uri)
    if snap is None:
        return
    doc, text = snap
    tracker = ls.session.next_edits
    if tracker.changed(uri, text):
        publish(ls, uri)
    state = tracker.documents[uri]
    if state.pending is not None:
        state.pending.cancel()
        state.pending = None
    if ls.session.settings.next_edit != "off":
        state.pending = ls.session.spawn(predict(ls, uri, doc.version, ls.session.settings.next_edit_delay_ms / 1000))


def closed(ls, uri: str) -> None:
    state = ls.session.next_edits.documents.get(uri)
    if state is not None and state.pending is not None:
        state.pending.cancel()
    ls.text_document_publish_diagnostics(lsp.PublishDiagnosticsParams(uri=uri, diagnostics=[]))


async def predict(ls, uri: str, version: int | None, delay: float = 0.0, *, again: bool = False) -> None:
    """After ``delay`` with the document still at ``version``: predict and publish."""
    if delay:
        await asyncio.sleep(delay)
    snap = ls.snapshot(uri)
    if snap is None or snap[0].version != version:
        return
    try:
        predictions = await ls.session.predict_next_edits(uri, snap[1], version, again=again)
    except JobCancelled as error:
        log.debug("next edit for %s: %s", uri, error.reason)
        state = ls.session.next_edits.documents.get(uri)
        if error.reason == PREEMPTED and state is not None and state.pending in (None, asyncio.current_task()):
            state.pending = ls.session.spawn(predict(ls, uri, version, ls.session.settings.next_edit_delay_ms / 1000))
        return
    except RequestTooLarge as error:  # candidates too far apart for the model: no prediction, and no error
        log.info("next edit for %s: %s", uri, error)
        return
    except Exception:  # noqa: BLE001 - a prediction that fails shows nothing; inline completion goes on
        log.exception("next-edit prediction failed")
        return
    if predictions is not None:
        publish(ls, uri)


def _ranges(ls, doc, predictions: list[Prediction]) -> list[lsp.Range]:
    positions = position_at(doc, [o for p in predictions for o in (p.start, p.end)])
    return [lsp.Range(start=positions[2 * i], end=positions[2 * i + 1]) for i in range(len(predictions))]


def _current(ls, uri: str):
    """(doc, predictions) when the predictions are for the document's text now."""
    snap = ls.snapshot(uri)
    if snap is None:
        return None, []
    doc, text = snap
    state = ls.session.next_edits.documents.get(uri)
    if state is None or state.text != text:
        return doc, []
    return doc, list(state.predictions)


def diagnostics(ls, uri: str) -> list[lsp.Diagnostic]:
    doc, predictions = _current(ls, uri)
    if not predictions:
        return []
    return [lsp.Diagnostic(range=rng, message=message(p), severity=lsp.DiagnosticSeverity.Hint, source=SOURCE,
                           code=CODE, data={"newText": p.text})
            for rng, p in zip(_ranges(ls, doc, predictions), predictions)]


def publish(ls, uri: str) -> None:
    doc = ls.document(uri)
    ls.text_document_publish_diagnostics(lsp.PublishDiagnosticsParams(
        uri=uri, version=doc.version if doc is not None else None, diagnostics=diagnostics(ls, uri)))


def quick_fixes(ls, uri: str, start: int, end: int) -> list[lsp.CodeAction]:
    """A quick fix applying each prediction that touches start..end, and one rejecting it."""
    doc, predictions = _current(ls, uri)
    hits = [p for p in predictions if p.start <= end and start <= p.end]
    actions = []
    for rng, p in zip(_ranges(ls, doc, hits), hits):
        diagnostic = lsp.Diagnostic(range=rng, message=message(p), severity=lsp.DiagnosticSeverity.Hint,
                                    source=SOURCE, code=CODE, data={"newText": p.text})
        actions.append(lsp.CodeAction(
            title=f"Diffu: {message(p)}", kind=lsp.CodeActionKind.QuickFix, diagnostics=[diagnostic],
            is_preferred=True, edit=lsp.WorkspaceEdit(changes={uri: [lsp.TextEdit(range=rng, new_text=p.text)]})))
        actions.append(lsp.CodeAction(
            title="Diffu: dismiss this next edit", kind=lsp.CodeActionKind.QuickFix, diagnostics=[diagnostic],
            command=lsp.Command(title="Dismiss", command=CMD_REJECT_NEXT_EDIT,
                                arguments=[{"textDocument": {"uri": uri}, "range": _json(rng)}])))
    return actions


def _json(rng: lsp.Range) -> dict:
    return {"start": {"line": rng.start.line, "character": rng.start.character},
            "end": {"line": rng.end.line, "character": rng.end.character}}


def _offsets(ls, uri: str, at, key: str) -> tuple[str, int, int]:
    """(uri, start, end) offsets of a command's parsed position or range (server.command_argument)."""
    snap = ls.snapshot(uri)
    if snap is None:
        raise JsonRpcInvalidParams(f"{uri} is not an open document")
    doc = snap[0]
    start = at.start if key == "range" else at
    end = at.end if key == "range" else at
    first, last = offset_at(doc, start), offset_at(doc, end, end_of_range=True)
    if first is None or last is None:
        raise JsonRpcInvalidParams(f"{key} is past the end of {uri}")
    return uri, first[0], last[0]


async def next_edit_command(ls, uri: str, position: lsp.Position) -> dict[str, Any] | None:
    """``diffu.nextEdit [{"textDocument": {"uri"}, "position"}]``: the nearest prediction at or
    after the position (wrapping around): ``{"range", "newText", "oldText", "message"}``, or null.
    Asked before the last edit settled (and with nothing shown), it predicts first."""
    uri, offset, _ = _offsets(ls, uri, position, "position")
    doc, predictions = _current(ls, uri)
    state = ls.session.next_edits.documents.get(uri)
    if not predictions and doc is not None and state is not None and state.settled != state.text:
        if state.pending is not None:  # asked before the pause ran out: predict now
            state.pending.cancel()
            state.pending = None
        await predict(ls, uri, doc.version)
        doc, predictions = _current(ls, uri)
    hit = nearest_after(predictions, offset)
    if hit is None:
        return None
    (rng,) = _ranges(ls, doc, [hit])
    return {"range": _json(rng), "newText": hit.text, "oldText": hit.old, "message": message(hit)}


async def reject_command(ls, uri: str, rng: lsp.Range) -> dict[str, Any]:
    """``diffu.rejectNextEdit [{"textDocument": {"uri"}, "range"}]``: drop the prediction there,
    never show it again for this text, and predict once more from the last edit."""
    uri, start, end = _offsets(ls, uri, rng, "range")
    rejected = ls.session.next_edits.reject(uri, start, end)
    publish(ls, uri)
    if rejected is not None:
        doc = ls.document(uri)
        await predict(ls, uri, doc.version if doc is not None else None, again=True)
    return {"rejected": rejected is not None}
