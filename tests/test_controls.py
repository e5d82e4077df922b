"""What the server decides for the editors' controls (issue #31), end to end over stdio: pytest-lsp's
client drives a real `python -m diffu_lsp` on a random-weight checkpoint (any text will do): the
settings inlineCompletion and disabledLanguages, several candidates per request (candidates), INFO
lines kept off stderr (logLevel), and the debug timeline of a suggestion."""

from __future__ import annotations

import re

import pytest
from lsprotocol import types as lsp

from test_server import (configure, end_of, inline, insert, mechanic, nothing_here, open_doc,  # noqa: F401 (fixture)
                         position_of, stats, until)

aio = pytest.mark.asyncio(loop_scope="module")


async def jobs_for(client, uri: str, position: lsp.Position) -> tuple[int, object, object]:
    """(jobs submitted, inline answer, completion answer) for one request of each at `position`."""
    before = (await stats(client))["submitted"]
    answer = await inline(client, uri, position)
    menu = await client.text_document_completion_async(lsp.CompletionParams(
        text_document=lsp.TextDocumentIdentifier(uri=uri), position=position,
        context=lsp.CompletionContext(trigger_kind=lsp.CompletionTriggerKind.Invoked)))
    return (await stats(client))["submitted"] - before, answer, menu


@aio
async def test_suggestions_off_globally_or_for_the_language_are_answered_empty_without_a_job(mechanic):
    text = "def add(a, b):\n    return "
    uri = open_doc(mechanic, text)
    at = end_of(text)
    jobs, _, _ = await jobs_for(mechanic, uri, at)
    assert jobs >= 1  # on by default: the model is asked
    for off in ({"inlineCompletion": False}, {"disabledLanguages": ["markdown", "python"]}):
        await configure(mechanic, off)
        jobs, answer, menu = await jobs_for(mechanic, uri, at)
        assert (jobs, nothing_here(answer), menu) == (0, True, None), off
    await configure(mechanic, {"disabledLanguages": ["markdown"]})  # another language's switch
    jobs, _, _ = await jobs_for(mechanic, uri, at)
    assert jobs >= 1


@aio
async def test_a_disabled_language_must_be_named(mechanic):
    mechanic.messages.clear()
    await configure(mechanic, {"disabledLanguages": ["python"]})
    mechanic.set_configuration({"disabledLanguages": [""]}, section="diffu")
    mechanic.workspace_did_change_configuration(lsp.DidChangeConfigurationParams(settings=None))
    warning = await until(lambda: [m for m in mechanic.messages if "disabledLanguages" in m.message], "a warning")
    assert warning[0].type == lsp.MessageType.Warning
    assert (await stats(mechanic))["settings"]["disabledLanguages"] == ["python"]


@pytest.mark.parametrize("log_level", [None, "info"])
def test_info_goes_to_the_editor_as_a_log_message_not_to_stderr(tmp_path, log_level):
    """Editors keep a server's stderr as its log (Neovim's lsp.log files every line as [ERROR]):
    by default only warnings and errors go there; what the user should see arrives as
    window/logMessage. logLevel "info" puts the INFO lines back on stderr."""
    from test_protocol_edges import RawServer

    raw = RawServer(tmp_path)
    try:
        raw.request(0, "initialize", {"processId": None, "rootUri": raw.root.as_uri(), "capabilities": {},
                                      "initializationOptions": {"logLevel": log_level} if log_level else None})
        raw.answer(0)
        raw.notify("initialized", {})
        loaded = raw.next(lambda m: m.get("method") == "window/logMessage" and "loaded" in m["params"]["message"],
                          "the model-loaded log message")
        assert loaded["params"]["type"] == lsp.MessageType.Info
        uri = (raw.root / "a.py").as_uri()  # an info the user is shown (window/showMessage) is no warning either
        raw.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                             "text": "x = 1\n\ny = 2\n"}})
        empty_line = {"start": {"line": 1, "character": 0}, "end": {"line": 1, "character": 0}}
        raw.request(1, "workspace/executeCommand", {"command": "diffu.refineSelection",
                                                    "arguments": [{"textDocument": {"uri": uri}, "range": empty_line}]})
        raw.answer(1)
        shown = raw.next(lambda m: m.get("method") == "window/showMessage", "the message why nothing changed")
        assert "nothing to refine" in shown["params"]["message"]
        raw.request(2, "shutdown")
        raw.answer(2)
        raw.notify("exit")
    finally:
        raw.close()
    info_lines = [line for line in raw.stderr().splitlines() if " INFO " in line]
    if log_level is None:
        assert not info_lines and "nothing to refine" not in raw.stderr(), raw.stderr()
    else:
        assert any("loaded" in line for line in info_lines), raw.stderr()
        assert any("nothing to refine" in line for line in info_lines), raw.stderr()


@aio
async def test_several_candidates_in_one_answer_distinct_and_typed_through(mechanic):
    """candidates = 3: one request answers up to three distinct suggestions at the cursor (the
    model's first choice first, as with candidates = 1); typing the start of one of them answers
    the rest of each candidate that starts so, from the cache (no job)."""
    text = "def add(a, b):\n    return "
    at = end_of(text)
    await configure(mechanic, {"candidates": 1, "disabledLanguages": []})
    single = await inline(mechanic, open_doc(mechanic, text), at)
    await configure(mechanic, {"candidates": 3})
    uri = open_doc(mechanic, text)
    answer = await inline(mechanic, uri, at)
    texts = [item.insert_text for item in answer.items]
    assert 2 <= len(texts) <= 3 and len(set(texts)) == len(texts), texts
    assert texts[0] == single.items[0].insert_text
    assert all(item.range.start == at for item in answer.items)
    second = texts[1]
    before = await stats(mechanic)
    insert(mechanic, uri, 2, at, second[:1])
    rest = await inline(mechanic, uri, position_of(text + second[:1], len(text) + 1), invoked=False)
    rests = [item.insert_text for item in rest.items]
    assert second[1:] in rests and rests == [t[1:] for t in texts if t.startswith(second[:1]) and len(t) > 1]
    assert (await stats(mechanic))["submitted"] == before["submitted"]


def test_the_debug_log_says_where_a_suggestion_s_time_went(caplog):
    """logLevel debug: each suggestion logs its timeline (debounce, queue, engine round trip, model
    time and forwards, total), and a cache hit says so."""
    import asyncio
    import logging

    from test_session import RecordingEngine, _ready_session

    session = _ready_session(RecordingEngine("value + 1"))
    text = "def f(value):\n    return \n"
    cursor = text.index("return ") + len("return ")

    async def go():
        await session.suggest("file:///a.py", text, cursor, 1, debounce=True)
        await session.suggest("file:///a.py", text[:cursor] + "v" + text[cursor:], cursor + 1, 2, debounce=True)
        await session.close()

    with caplog.at_level(logging.DEBUG, logger="diffu_lsp.session"):
        asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("timeline")]
    assert len(lines) == 2, lines
    assert re.fullmatch(r"timeline file:///a.py v1: debounce 60 ms, queue [\d.]+ ms, engine [\d.]+ ms \(round trip "
                        r"[\d.]+ ms, model 0.0 ms in 1 forwards, 1 candidates\), [\d.]+ ms in all", lines[0]), lines[0]
    assert re.fullmatch(r"timeline file:///a.py v2: from the cache \(typed through\) in [\d.]+ ms", lines[1]), lines[1]
