"""Next-edit predictions through the real server: hints, quick fixes, the commands, withdrawal."""

from __future__ import annotations

import asyncio

import pytest_asyncio
from lsprotocol import types as lsp

from test_nextedit import BEFORE
from test_server import (MODEL_ARGS, aio, code_actions, execute, open_doc, position_of, start_server, stats,
                         stop_server, until, wait_status)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(tmp_path_factory):
    c = await start_server(tmp_path_factory.mktemp("nextedit"), *MODEL_ARGS, init_options={"nextEditDelayMs": 50})
    await wait_status(c, "ready")
    yield c
    await stop_server(c)


def change(client, uri: str, version: int, text: str, old: str, new: str) -> str:
    """Replace the first ``old`` in ``text`` by ``new`` as the editor would (one ranged change)."""
    at = text.index(old)
    rng = lsp.Range(start=position_of(text, at), end=position_of(text, at + len(old)))
    client.text_document_did_change(lsp.DidChangeTextDocumentParams(
        text_document=lsp.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[lsp.TextDocumentContentChangePartial(range=rng, text=new)]))
    return text[:at] + new + text[at + len(old):]


def hint_lines(client, uri: str) -> list[int]:
    return [d.range.start.line for d in client.diagnostics.get(uri, ())]


@aio
async def test_a_rename_is_predicted_at_the_other_uses_jumped_to_applied_and_dismissed(client):
    uri = open_doc(client, BEFORE)
    text = change(client, uri, 2, BEFORE, "    count = 0", "    total = 0")
    await until(lambda: hint_lines(client, uri) == [4, 5, 6], "three next-edit hints")
    first = client.diagnostics[uri][0]
    assert (first.severity, first.source, first.message) == (lsp.DiagnosticSeverity.Hint, "diffu",
                                                             "next edit: count → total")
    assert text.splitlines()[4][first.range.start.character:first.range.end.character] == "count"

    found = await execute(client, "diffu.nextEdit", textDocument={"uri": uri}, position={"line": 1, "character": 0})
    assert found["range"]["start"]["line"] == 4 and found["newText"] == "total" and found["oldText"] == "count"

    actions = await code_actions(client, uri, lsp.Range(start=first.range.start, end=first.range.start))
    fix = next(a for a in actions if a.kind == lsp.CodeActionKind.QuickFix and a.edit is not None)
    (edit,) = fix.edit.changes[uri]
    assert edit.new_text == "total" and edit.range == first.range
    text = change(client, uri, 3, text, "count += 1", "total += 1")  # the editor applies it
    await until(lambda: hint_lines(client, uri) == [5, 6], "the applied hint withdrawn, the others kept")

    rejected = await execute(client, "diffu.rejectNextEdit", textDocument={"uri": uri},
                             range={"start": {"line": 5, "character": 0}, "end": {"line": 5, "character": 30}})
    assert rejected == {"rejected": True}
    await until(lambda: hint_lines(client, uri) == [6], "the dismissed hint gone for good")
    found = await execute(client, "diffu.nextEdit", textDocument={"uri": uri}, position={"line": 0, "character": 0})
    assert found["range"]["start"]["line"] == 6


@aio
async def test_typing_over_a_hint_withdraws_it_and_the_job_runs_at_the_lowest_priority(client):
    uri = open_doc(client, BEFORE)
    text = change(client, uri, 2, BEFORE, "    count = 0", "    hits = 0")
    await until(lambda: hint_lines(client, uri) == [4, 5, 6], "three next-edit hints")
    change(client, uri, 3, text, "return count", "return count2")
    await until(lambda: hint_lines(client, uri) == [4, 5], "the hint under the typing withdrawn")
    records = [r for r in (await stats(client))["records"] if r["key"] == f"{uri}#next"]
    assert records and records[0]["outcome"] == "completed"


@aio
async def test_next_edit_off_predicts_nothing(client):
    client.set_configuration({"nextEdit": "off"}, section="diffu")
    client.workspace_did_change_configuration(lsp.DidChangeConfigurationParams(settings=None))
    try:
        for _ in range(100):
            if (await stats(client))["settings"]["nextEdit"] == "off":
                break
            await asyncio.sleep(0.05)
        uri = open_doc(client, BEFORE)
        change(client, uri, 2, BEFORE, "    count = 0", "    total = 0")
        await asyncio.sleep(1.0)
        assert hint_lines(client, uri) == []
        assert not [r for r in (await stats(client))["records"] if r["key"] == f"{uri}#next"]
    finally:
        client.set_configuration({}, section="diffu")
        client.workspace_did_change_configuration(lsp.DidChangeConfigurationParams(settings=None))


@aio
async def test_asked_before_the_edit_settles_the_command_predicts_at_once(client):
    client.set_configuration({"nextEditDelayMs": 60_000}, section="diffu")
    client.workspace_did_change_configuration(lsp.DidChangeConfigurationParams(settings=None))
    try:
        for _ in range(100):
            if (await stats(client))["settings"]["nextEditDelayMs"] == 60_000:
                break
            await asyncio.sleep(0.05)
        uri = open_doc(client, BEFORE)
        change(client, uri, 2, BEFORE, "    count = 0", "    total = 0")
        found = await execute(client, "diffu.nextEdit", textDocument={"uri": uri},
                              position={"line": 5, "character": 0})
        assert found["range"]["start"]["line"] == 5 and found["newText"] == "total"
        await until(lambda: hint_lines(client, uri) == [4, 5, 6], "the hints published too")
    finally:
        client.set_configuration({}, section="diffu")
        client.workspace_did_change_configuration(lsp.DidChangeConfigurationParams(settings=None))

