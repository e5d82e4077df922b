"""End-to-end tests of the language server: pytest-lsp's client drives a real
`python -m diffu_lsp` process over stdio, with a real model behind it.

Servers: `client` (the bundled model, UTF-8 positions) for everything where the model's text
matters; `mechanic` (a random-weight checkpoint in Dream's format, small holes, one token per
forward pass) for the commands, whose edits and progress only need *some* text; the settings
tests and the broken-model test start their own. Decoding is greedy (the default), so answers
are deterministic for a checkpoint; the bundled model is still being trained, so tests never
hard-code its text: they compare the server with itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import socket
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Any, Union

import pytest
import pytest_asyncio
from lsprotocol import types as lsp
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcMethodNotFound, JsonRpcRequestCancelled
from pytest_lsp import ClientServerConfig, LanguageClient
from pytest_lsp.client import make_test_lsp_client

from diffu_lsp import features
from diffu_lsp import server as server_mod
from diffu_lsp.job import Step
from diffu_lsp.session import progress_message
from diffu_lsp.settings import user_config_file

from samples import SAMPLE as MODULE

aio = pytest.mark.asyncio(loop_scope="module")  # the tests share the module's server and loop

WAIT_S = 120  # model loads and jobs on a busy 2-core machine

SAMPLE = MODULE + "    "  # the cursor inside `if __name__ == "__main__":`

HOLES = '''\
def area(width, height):
    ...


def perimeter(width, height):
    ...


def describe(shape):
    return str(shape)
'''

OUR_KINDS = {server_mod.KIND_REFINE, server_mod.KIND_FILL_HOLES, server_mod.KIND_COMPLETE_BLOCK}

# Slow jobs (one token revealed per forward pass) so that edits land while a job runs.
SLOW = {"algorithm": "entropy", "kvCache": "none", "singleLineTokens": 64, "multiLineTokens": 64, "blockTokens": 64}

def stdlib_places(module: str = "textwrap.py", count: int = 8) -> list[tuple[str, int]]:
    """(text, offset): positions after `if ` / `return ` in a real standard-library file, the
    kind of code the bundled model learns from."""
    path = Path(sysconfig.get_paths()["stdlib"]) / module
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    return [(text, m.end()) for m in re.finditer(r"\n +(?:if|return) ", text)][:count]


# Places where a code model has something to say: real code first, then small snippets (cursor
# at the end). The bundled model is small and still training: at a given place it may well
# have nothing to add, but not at all of them.
CANDIDATES = stdlib_places() + [(text, len(text)) for text in [
    SAMPLE,
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = ",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return ",
    "import os\n\n\ndef exists(path):\n    return os.path.",
    "def first(items):\n    for item in items:\n        return ",
    "def greet(name):\n    print(",
]]


# ------------------------------------------------------------------ client plumbing

def plain(value: Any) -> Any:
    """pygls hands custom messages over as namedtuples; make dicts and lists of them."""
    if hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def make_client() -> LanguageClient:
    client = make_test_lsp_client()
    converter = client.protocol._converter

    # lsprotocol reads any object with a "command" key as a Command, but a CodeAction may
    # carry a command too: only a string "command" makes it a Command.
    def command_or_code_action(obj, _type):
        if isinstance(obj.get("command"), str):
            return converter.structure(obj, lsp.Command)
        return converter.structure(obj, lsp.CodeAction)

    converter.register_structure_hook(Union[lsp.Command, lsp.CodeAction], command_or_code_action)

    client.statuses = []
    client.edits = []
    client.apply_result = True

    @client.feature(server_mod.STATUS)
    def on_status(params):
        client.statuses.append(plain(params))

    @client.feature(lsp.WORKSPACE_APPLY_EDIT)
    def on_apply_edit(params: lsp.ApplyWorkspaceEditParams):
        client.edits.append(params)
        return lsp.ApplyWorkspaceEditResult(applied=client.apply_result)

    return client


def capabilities(encodings: list[str] | None = None) -> lsp.ClientCapabilities:
    return lsp.ClientCapabilities(
        general=lsp.GeneralClientCapabilities(position_encodings=encodings),
        window=lsp.WindowClientCapabilities(work_done_progress=True),
        workspace=lsp.WorkspaceClientCapabilities(
            apply_edit=True, configuration=True,
            workspace_edit=lsp.WorkspaceEditClientCapabilities(document_changes=True),
            did_change_configuration=lsp.DidChangeConfigurationClientCapabilities()),
        text_document=lsp.TextDocumentClientCapabilities(
            synchronization=lsp.TextDocumentSyncClientCapabilities(),
            inline_completion=lsp.InlineCompletionClientCapabilities(),
            completion=lsp.CompletionClientCapabilities(completion_item=lsp.ClientCompletionItemOptions(
                documentation_format=[lsp.MarkupKind.Markdown, lsp.MarkupKind.PlainText])),
            code_action=lsp.CodeActionClientCapabilities(code_action_literal_support=lsp.ClientCodeActionLiteralOptions(
                code_action_kind=lsp.ClientCodeActionKindOptions(value_set=["", "refactor", "refactor.rewrite"])))))


# The bundled model unless DIFFU_LSP_TEST_MODEL names another checkpoint folder.
MODEL_ARGS = ("--model", os.environ["DIFFU_LSP_TEST_MODEL"]) if os.environ.get("DIFFU_LSP_TEST_MODEL") else ()


def server_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffu_lsp", *args]


async def start_server(tmp: Path, *args: str, encodings=None, init_options=None,
                       configuration: dict | None = None) -> LanguageClient:
    """A server on `tmp`: XDG_CONFIG_HOME=tmp/xdg, workspace root tmp/ws."""
    (tmp / "xdg").mkdir(exist_ok=True)
    (tmp / "ws").mkdir(exist_ok=True)
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp / "xdg"),
           # One torch thread: on a machine shared with training, spinning OpenMP threads
           # that wait for each other make every forward pass many times slower.
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    config = ClientServerConfig(server_command=server_command(*args), client_factory=make_client, server_env=env)
    client = await config.start()
    if configuration is not None:
        client.set_configuration(configuration, section="diffu")
    client.init_result = await client.initialize_session(lsp.InitializeParams(
        capabilities=capabilities(encodings), root_uri=(tmp / "ws").as_uri(),
        initialization_options=init_options))
    return client


async def stop_server(client: LanguageClient) -> None:
    try:
        await asyncio.wait_for(client.shutdown_session(), 30)
    finally:
        await client.stop()


async def until(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_status(client: LanguageClient, state: str, after: int = 0) -> dict:
    return await until(lambda: next((s for s in client.statuses[after:] if s["state"] == state), None),
                       f"diffu/status {state}")


async def stats(client: LanguageClient) -> dict:
    return plain(await client.protocol.send_request_async(server_mod.STATS, None))


async def until_stats(client: LanguageClient, predicate, what: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while not predicate(st := await stats(client)):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return st


async def configure(client: LanguageClient, settings: dict) -> dict:
    """Change the `diffu` configuration section and wait until the server has pulled it."""
    client.set_configuration(settings, section="diffu")
    client.workspace_did_change_configuration(lsp.DidChangeConfigurationParams(settings=None))
    st = await until_stats(client, lambda st: all(st["settings"].get(k) == v for k, v in settings.items()),
                           f"settings {settings} to be applied")
    return st["settings"]


async def raw_request(client: LanguageClient, method: str, params: Any):
    """Send a request exactly as given (no client-side typing), await the answer."""
    msg_id = f"raw-{uuid.uuid4().hex[:8]}"
    future: concurrent.futures.Future = concurrent.futures.Future()
    client.protocol._request_futures[msg_id] = future
    client.protocol._send_data({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
    return await asyncio.wait_for(asyncio.wrap_future(future), WAIT_S)


_opened = 0


def open_doc(client: LanguageClient, text: str, name: str | None = None, version: int = 1) -> str:
    global _opened
    _opened += 1
    uri = f"file:///virtual/{name or f'doc{_opened}'}.py"
    client.text_document_did_open(lsp.DidOpenTextDocumentParams(text_document=lsp.TextDocumentItem(
        uri=uri, language_id="python", version=version, text=text)))
    return uri


def position_of(text: str, offset: int, encoding: str = "utf-16") -> lsp.Position:
    """The LSP position of a character offset (code units of `encoding`)."""
    line = text.count("\n", 0, offset)
    start = text.rfind("\n", 0, offset) + 1
    units = text[start:offset].encode("utf-16-le" if encoding == "utf-16" else encoding)
    return lsp.Position(line=line, character=len(units) // (2 if encoding == "utf-16" else 1))


def end_of(text: str) -> lsp.Position:
    return position_of(text, len(text))


def insert(client: LanguageClient, uri: str, version: int, at: lsp.Position, text: str) -> None:
    client.text_document_did_change(lsp.DidChangeTextDocumentParams(
        text_document=lsp.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[lsp.TextDocumentContentChangePartial(range=lsp.Range(start=at, end=at), text=text)]))


async def inline(client: LanguageClient, uri: str, position: lsp.Position, *, invoked: bool = True):
    kind = lsp.InlineCompletionTriggerKind.Invoked if invoked else lsp.InlineCompletionTriggerKind.Automatic
    return await client.text_document_inline_completion_async(lsp.InlineCompletionParams(
        text_document=lsp.TextDocumentIdentifier(uri=uri), position=position,
        context=lsp.InlineCompletionContext(trigger_kind=kind)))


def nothing_here(result) -> bool:
    """The answer that says "no suggestion here": an empty list (a client drops its last ghost
    text), not null (which a client such as Neovim reads as "keep what you show")."""
    items = result.items if isinstance(result, lsp.InlineCompletionList) else result
    return items is not None and len(items) == 0


def inline_text(result) -> str | None:
    if result is None:
        return None
    items = result.items if isinstance(result, lsp.InlineCompletionList) else result
    assert len(items) <= 1
    return items[0].insert_text if items else None


async def execute(client: LanguageClient, command: str, **arg) -> dict:
    result = await client.workspace_execute_command_async(lsp.ExecuteCommandParams(command=command, arguments=[arg]))
    return plain(result)


async def reporting_token(client: LanguageClient, tokens_before: set):
    """The progress token, new since `tokens_before`, that a command has reported a step on."""
    def reported():
        for token in set(client.progress_reports) - tokens_before:
            if any(isinstance(r, lsp.WorkDoneProgressReport) for r in client.progress_reports[token]):
                return token

    return await until(reported, "a command's progress report")


def jobs_of(st: dict, uri: str) -> list[dict]:
    return [r for r in st["records"] if r["key"] in (uri, f"{uri}#command")]


async def model_suggestion(client: LanguageClient, min_length: int = 1):
    """(text, offset, suggestion): the first of CANDIDATES where the model suggests something
    (at least `min_length` characters before any line break)."""
    for text, offset in CANDIDATES:
        position = position_of(text, offset, "utf-8")  # the shared server negotiated UTF-8
        suggestion = inline_text(await inline(client, open_doc(client, text), position))
        if suggestion and len(suggestion.split("\n")[0]) >= min_length:
            return text, offset, suggestion
    raise AssertionError(f"the model suggested nothing at any of {len(CANDIDATES)} places")


# ------------------------------------------------------------------ fixtures

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(tmp_path_factory):
    """The shared server: bundled model, no config files, client prefers UTF-8 positions."""
    c = await start_server(tmp_path_factory.mktemp("main"), *MODEL_ARGS, encodings=["utf-8", "utf-16"])
    await wait_status(c, "ready")
    yield c
    await stop_server(c)


@pytest_asyncio.fixture(loop_scope="module")
async def scratch(client):
    """The shared server, its settings restored after a test that changes them."""
    before = (await stats(client))["settings"]
    yield client
    client.set_configuration({}, section="diffu")
    client.workspace_did_change_configuration(lsp.DidChangeConfigurationParams(settings=None))
    await until_stats(client, lambda st: st["settings"] == before, "the settings to be restored")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mechanic(tmp_path_factory, random_dream):
    """A server on a random-weight checkpoint: small holes, one token per forward pass."""
    c = await start_server(tmp_path_factory.mktemp("mechanic"), "--model", str(random_dream), init_options={
        "algorithm": "entropy", "singleLineTokens": 8, "multiLineTokens": 8, "blockTokens": 8})
    await wait_status(c, "ready")
    yield c
    await stop_server(c)


# ------------------------------------------------------------------ capabilities, completions

@aio
async def test_initialize_advertises_features(client):
    caps = client.init_result.capabilities
    assert client.init_result.server_info.name == "diffu-lsp"
    assert caps.inline_completion_provider is not None
    assert caps.completion_provider is not None
    assert set(caps.code_action_provider.code_action_kinds) == OUR_KINDS | {lsp.CodeActionKind.QuickFix}  # next edits
    assert set(caps.execute_command_provider.commands) >= {
        server_mod.CMD_COMPLETE_BLOCK, server_mod.CMD_FILL_HOLES, server_mod.CMD_REFINE}
    sync = caps.text_document_sync
    assert getattr(sync, "change", sync) == lsp.TextDocumentSyncKind.Incremental
    assert caps.position_encoding == lsp.PositionEncodingKind.Utf8  # the client's first choice
    ready = next(s for s in client.statuses if s["state"] == "ready")
    assert ready["model"] == (MODEL_ARGS[1] if MODEL_ARGS else "bundled tiny model")
    st = await stats(client)
    assert st["model_state"] == "ready" and st["model_loads"] == 1


@aio
async def test_inline_completion_is_model_text(client):
    text, offset, _ = await model_suggestion(client)
    uri = open_doc(client, text)  # a fresh document: nothing to reuse
    before = await stats(client)
    position = position_of(text, offset, "utf-8")
    result = await inline(client, uri, position)
    suggestion = inline_text(result)
    assert suggestion and suggestion.strip()
    assert result.items[0].range.start == position
    after = await stats(client)
    assert after["completed"] == before["completed"] + 1
    (job,) = jobs_of(after, uri)  # it came from denoising, not from a cache
    assert job["outcome"] == "completed" and job["forwards"] >= 1


@aio
async def test_completion_fallback_item_inserts_the_block(client):
    text, offset, expected = await model_suggestion(client)
    uri = open_doc(client, text)
    position = position_of(text, offset, "utf-8")
    result = await client.text_document_completion_async(lsp.CompletionParams(
        text_document=lsp.TextDocumentIdentifier(uri=uri), position=position,
        context=lsp.CompletionContext(trigger_kind=lsp.CompletionTriggerKind.Invoked)))
    assert isinstance(result, lsp.CompletionList) and result.is_incomplete
    (item,) = result.items
    first_line = next(line.strip() for line in expected.splitlines() if line.strip())
    assert item.label == f"⟡ diffu: {first_line[:60]}"
    assert item.text_edit.new_text == expected
    assert item.text_edit.range.start == position
    assert item.insert_text_format == lsp.InsertTextFormat.PlainText
    assert item.kind in (lsp.CompletionItemKind.Snippet, lsp.CompletionItemKind.Text)
    assert item.detail == "diffusion model" and item.sort_text == "0"
    assert expected in item.documentation.value


@aio
async def test_typed_through_reuse_answers_without_the_model(client):
    text, offset, _ = await model_suggestion(client, min_length=2)
    uri = open_doc(client, text)
    first = inline_text(await inline(client, uri, position_of(text, offset, "utf-8")))
    before = await stats(client)
    typed = first[:2]
    insert(client, uri, 2, position_of(text, offset, "utf-8"), typed)
    text = text[:offset] + typed + text[offset:]
    after_typing = position_of(text, offset + 2, "utf-8")
    result = await inline(client, uri, after_typing, invoked=False)
    assert inline_text(result) == first[2:]
    assert result.items[0].range.start == after_typing
    after = await stats(client)
    assert after["typed_through_hits"] == before["typed_through_hits"] + 1
    assert after["submitted"] == before["submitted"]  # no job at all
    # Typing something else is a new model call.
    insert(client, uri, 3, after_typing, "#")
    await inline(client, uri, position_of(text[:offset + 2] + "#", offset + 3, "utf-8"))
    assert (await stats(client))["submitted"] == before["submitted"] + 1


@aio
async def test_burst_of_edits_newest_version_wins(scratch):
    client = scratch
    await configure(client, SLOW)
    text = SAMPLE
    uri = open_doc(client, text)
    await asyncio.sleep(0.3)
    before = await stats(client)
    requests = []
    for version, ch in enumerate("main(", start=2):
        insert(client, uri, version, end_of(text), ch)
        text += ch
        requests.append(asyncio.ensure_future(inline(client, uri, end_of(text), invoked=False)))
        await asyncio.sleep(0.3)  # the job of this request starts (60 ms debounce) and runs
    answers = await asyncio.wait_for(asyncio.gather(*requests), WAIT_S)
    assert all(a is None for a in answers[:-1]), answers  # superseded: null, not "nothing here"
    # The last answer is what the model says for the newest text (same content, fresh document).
    reference = inline_text(await inline(client, open_doc(client, text), end_of(text)))
    assert inline_text(answers[-1]) == reference
    after = await stats(client)
    burst = [r for r in jobs_of(after, uri) if r["id"] > max([0] + [r["id"] for r in before["records"]])]
    superseded = [r for r in burst if r["outcome"] in ("stale", "superseded", "cancelled")]
    assert len(superseded) == len(requests) - 1
    assert any(r["ran"] and r["forwards"] >= 1 for r in superseded), ("no job was cancelled while running", burst)
    assert all(r["forwards_after_cancel"] <= 1 for r in superseded)
    assert after["max_forwards_after_cancel"] <= 1
    assert [r["outcome"] for r in burst if r["outcome"] == "completed"] == ["completed"]


@aio
async def test_notifications_leave_nothing_behind(client):
    """pygls keeps each notification's future unless the server drops it: a leak of ~1 KiB per
    keystroke that grew the soak's servers by 30 MiB in 45 minutes."""
    text = SAMPLE
    uri = open_doc(client, text)
    for version, ch in enumerate("x = 1  # " + "y" * 200, start=2):
        insert(client, uri, version, end_of(text), ch)
        text += ch
    st = await stats(client)  # answered after every didChange before it was handled
    assert st["handlers_pending"] <= 2, st["handlers_pending"]


# ------------------------------------------------------------------ code actions and commands

async def code_actions(client, uri, rng, only=None):
    return await client.text_document_code_action_async(lsp.CodeActionParams(
        text_document=lsp.TextDocumentIdentifier(uri=uri), range=rng,
        context=lsp.CodeActionContext(diagnostics=[], only=only)))


def rng(l1, c1, l2, c2) -> lsp.Range:
    return lsp.Range(start=lsp.Position(line=l1, character=c1), end=lsp.Position(line=l2, character=c2))


@aio
async def test_code_actions_are_offered_where_they_apply(client):
    uri = open_doc(client, HOLES)
    actions = await code_actions(client, uri, rng(0, 0, 5, 7))
    assert all(isinstance(a, lsp.CodeAction) for a in actions)
    assert {a.kind for a in actions} == OUR_KINDS
    by_kind = {a.kind: a for a in actions}
    fill = by_kind[server_mod.KIND_FILL_HOLES].command
    assert fill.command == server_mod.CMD_FILL_HOLES
    assert plain(fill.arguments) == [{"textDocument": {"uri": uri},
                                      "range": {"start": {"line": 0, "character": 0}, "end": {"line": 5, "character": 7}}}]
    assert by_kind[server_mod.KIND_REFINE].command.command == server_mod.CMD_REFINE
    assert by_kind[server_mod.KIND_COMPLETE_BLOCK].command.command == server_mod.CMD_COMPLETE_BLOCK
    # Cursor inside a def with a hole: fill holes (enclosing block), no refine (empty selection).
    kinds = {a.kind for a in await code_actions(client, uri, rng(1, 2, 1, 2))}
    assert kinds == {server_mod.KIND_FILL_HOLES, server_mod.KIND_COMPLETE_BLOCK}
    # No hole markers in `describe`: no fill holes.
    kinds = {a.kind for a in await code_actions(client, uri, rng(9, 4, 9, 10))}
    assert kinds == {server_mod.KIND_REFINE, server_mod.KIND_COMPLETE_BLOCK}
    # `only` filters hierarchically.
    only = await code_actions(client, uri, rng(0, 0, 5, 7), only=[server_mod.KIND_REFINE])
    assert [a.kind for a in only] == [server_mod.KIND_REFINE]
    assert not await code_actions(client, uri, rng(0, 0, 5, 7), only=["quickfix"])


@aio
async def test_fill_holes_sends_one_edit_for_all_holes(mechanic):
    client = mechanic
    uri = open_doc(client, HOLES)
    client.edits.clear()
    result = await execute(client, server_mod.CMD_FILL_HOLES, textDocument={"uri": uri},
                           range={"start": {"line": 0, "character": 0}, "end": {"line": 5, "character": 7}})
    assert result == {"applied": True}
    (params,) = client.edits
    (change,) = params.edit.document_changes
    assert change.text_document.uri == uri and change.text_document.version == 1
    assert [e.range for e in change.edits] == [rng(1, 4, 1, 7), rng(5, 4, 5, 7)]  # the two `...`
    assert all(e.new_text and "..." not in e.new_text for e in change.edits)
    assert not [e.new_text for e in change.edits if e.new_text[:1].isspace()]  # at the marker's indentation
    (job,) = jobs_of(await stats(client), uri)  # both holes in one canvas: one job
    assert job["key"] == f"{uri}#command" and job["outcome"] == "completed"
    assert job["forwards"] <= 2 * 8  # 8-token holes, at most one forward per token


@aio
async def test_fill_holes_with_an_empty_range_fills_the_enclosing_function(mechanic):
    """The editors send the cursor as an empty range; the server decides it means the enclosing
    def (issue #15): only `perimeter`'s hole is filled, not `area`'s, and in `describe` (no
    marker) nothing is, with a message that names the enclosing def/class."""
    client = mechanic
    uri = open_doc(client, HOLES)
    client.edits.clear()
    client.messages.clear()
    cursor = {"line": 5, "character": 2}  # in perimeter's body, before its `...`
    result = await execute(client, server_mod.CMD_FILL_HOLES, textDocument={"uri": uri},
                           range={"start": cursor, "end": cursor})
    assert result == {"applied": True}
    (params,) = client.edits
    (change,) = params.edit.document_changes
    assert [e.range for e in change.edits] == [rng(5, 4, 5, 7)]  # perimeter's `...` only
    assert change.edits[0].new_text and "..." not in change.edits[0].new_text

    client.edits.clear()
    cursor = {"line": 9, "character": 4}  # in describe: no marker in it
    result = await execute(client, server_mod.CMD_FILL_HOLES, textDocument={"uri": uri},
                           range={"start": cursor, "end": cursor})
    assert result == {"applied": False} and not client.edits
    (message,) = await until(lambda: [m.message for m in client.messages if "fill holes" in m.message], "a message")
    assert "enclosing def/class" in message


@aio
async def test_fill_holes_without_a_marker_says_which_markers_count(mechanic):
    client = mechanic
    uri = open_doc(client, "def f(x):\n    return x[...]\n")
    client.messages.clear()
    client.edits.clear()
    result = await execute(client, server_mod.CMD_FILL_HOLES, textDocument={"uri": uri},
                           range={"start": {"line": 0, "character": 0}, "end": {"line": 1, "character": 18}})
    assert result == {"applied": False} and not client.edits
    (message,) = await until(lambda: [m.message for m in client.messages if "fill holes" in m.message], "a message")
    assert "no hole marker" in message and "'pass  # TODO'" in message and "whole statement" in message
    assert not jobs_of(await stats(client), uri)  # no model job for nothing to fill


@aio
async def test_complete_block_and_fill_holes_stream_their_drafts_as_progress(mechanic):
    client = mechanic
    uri = open_doc(client, HOLES)
    pending_before = (await stats(client))["handlers_pending"]
    for command, where in ((server_mod.CMD_COMPLETE_BLOCK, {"position": {"line": 1, "character": 4}}),
                           (server_mod.CMD_FILL_HOLES, {"range": {"start": {"line": 0, "character": 0},
                                                                  "end": {"line": 10, "character": 0}}})):
        tokens_before = set(client.progress_reports)
        await execute(client, command, textDocument={"uri": uri}, **where)
        (token,) = set(client.progress_reports) - tokens_before
        reports = client.progress_reports[token]
        assert isinstance(reports[0], lsp.WorkDoneProgressBegin) and reports[0].cancellable, command
        assert reports[1].message == "starting", command  # at once, before the first step
        steps = [r.message for r in reports[2:] if isinstance(r, lsp.WorkDoneProgressReport)]
        assert steps and all(re.match(r"step \d+: \d+ tokens left", m) for m in steps), command
        assert steps[0].startswith("step 1: ") and re.match(r"step \d+: 0 tokens left", steps[-1]), command
        assert isinstance(reports[-1], lsp.WorkDoneProgressEnd) and reports[-1].message == "done", command
    # pygls filed each command's own task under a uuid and kept it: one entry per command, for good
    assert (await stats(client))["handlers_pending"] == pending_before


@aio
async def test_complete_block_inserts_at_the_cursor(mechanic):
    client = mechanic
    text = "def fibonacci(n):\n    \n\n\ndef main():\n    pass\n"
    uri = open_doc(client, text)
    client.edits.clear()
    result = await execute(client, server_mod.CMD_COMPLETE_BLOCK, textDocument={"uri": uri},
                           position={"line": 1, "character": 4})
    assert result == {"applied": True}
    (edit,) = client.edits[0].edit.document_changes[0].edits
    assert edit.range == rng(1, 4, 1, 4) and edit.new_text
    (job,) = jobs_of(await stats(client), uri)
    assert job["outcome"] == "completed"


@aio
async def test_refine_reports_progress_and_edits_the_selection(mechanic):
    client = mechanic
    uri = open_doc(client, HOLES)
    client.edits.clear()
    tokens_before = set(client.progress_reports)
    result = await execute(client, server_mod.CMD_REFINE, textDocument={"uri": uri},
                           range={"start": {"line": 8, "character": 0}, "end": {"line": 9, "character": 21}})
    assert result == {"applied": True}
    (edit,) = client.edits[0].edit.document_changes[0].edits
    assert edit.range == rng(8, 0, 9, 21) and edit.new_text
    (token,) = set(client.progress_reports) - tokens_before
    reports = client.progress_reports[token]
    assert isinstance(reports[0], lsp.WorkDoneProgressBegin) and reports[0].cancellable
    steps = [r for r in reports[2:] if isinstance(r, lsp.WorkDoneProgressReport)]
    assert reports[1].message == "starting" and steps and all("step" in r.message for r in steps)
    assert isinstance(reports[-1], lsp.WorkDoneProgressEnd) and reports[-1].message == "done"
    (job,) = jobs_of(await stats(client), uri)
    # the first step, then at most one per PROGRESS_INTERVAL_S, and the last
    assert job["outcome"] == "completed" and 1 <= len(steps) <= job["forwards"]
    # the streamed draft: masked runs shown as "…" while it firms up, and at the end the edit's text
    left = [int(re.search(r"(\d+) tokens left", r.message).group(1)) for r in steps]
    assert left == sorted(left, reverse=True) and left[-1] == 0
    assert any("…" in r.message for r in steps[:-1])
    assert steps[-1].message == progress_message(Step(job["forwards"], 0, edit.new_text))


@aio
async def test_refine_with_an_empty_range_refines_the_line_it_is_on(mechanic):
    """The editors send the cursor as an empty range; the server decides it means the line (its
    text, not its line break), for every editor alike."""
    client = mechanic
    uri = open_doc(client, HOLES)
    client.edits.clear()
    cursor = {"line": 9, "character": 4}  # inside `    return str(shape)`
    result = await execute(client, server_mod.CMD_REFINE, textDocument={"uri": uri},
                           range={"start": cursor, "end": cursor})
    assert result == {"applied": True}
    (edit,) = client.edits[0].edit.document_changes[0].edits
    assert edit.range == rng(9, 0, 9, len("    return str(shape)")) and edit.new_text
    (job,) = jobs_of(await stats(client), uri)
    assert job["outcome"] == "completed" and job["forwards"] > 0


@aio
async def test_a_command_that_changes_nothing_tells_the_user_why(mechanic):
    """The server decides what a command's outcome means, so it says why nothing changed
    (window/showMessage), and the clients no longer add their own "no change was applied" (two
    messages for one outcome, seen in VS Code). Refine on an empty line only logged its reason."""
    client = mechanic
    uri = open_doc(client, "x = 1\n\ny = 2\n")
    client.messages.clear()
    client.edits.clear()
    cursor = {"line": 1, "character": 0}
    result = await execute(client, server_mod.CMD_REFINE, textDocument={"uri": uri}, range={"start": cursor, "end": cursor})
    assert result == {"applied": False} and not client.edits
    (message,) = await until(lambda: [m.message for m in client.messages if "refine" in m.message], "a message")
    assert "the line is empty" in message


@aio
@pytest.mark.filterwarnings("ignore:Unknown progress token")  # pygls's test client knows only tokens it created
async def test_refine_reports_progress_on_the_client_s_work_done_token(mechanic):
    client = mechanic
    uri = open_doc(client, HOLES)
    tokens_before = set(client.progress_reports)
    arg = {"textDocument": {"uri": uri}, "range": {"start": {"line": 8, "character": 0},
                                                   "end": {"line": 9, "character": 21}}}
    result = await client.workspace_execute_command_async(lsp.ExecuteCommandParams(
        command=server_mod.CMD_REFINE, arguments=[arg], work_done_token="client-token-7"))
    assert plain(result) == {"applied": True}
    assert set(client.progress_reports) - tokens_before == {"client-token-7"}  # no token of the server's own
    reports = client.progress_reports["client-token-7"]
    assert isinstance(reports[0], lsp.WorkDoneProgressBegin) and isinstance(reports[-1], lsp.WorkDoneProgressEnd)


@aio
async def test_cancelling_refine_progress_stops_the_job(mechanic):
    client = mechanic
    uri = open_doc(client, SAMPLE)
    client.edits.clear()
    tokens_before = set(client.progress_reports)
    command = asyncio.ensure_future(execute(  # about 100 tokens, one forward pass each
        client, server_mod.CMD_REFINE, textDocument={"uri": uri},
        range={"start": {"line": 4, "character": 0}, "end": {"line": 20, "character": 0}}))

    token = await reporting_token(client, tokens_before)
    client.window_work_done_progress_cancel(lsp.WorkDoneProgressCancelParams(token=token))
    assert await asyncio.wait_for(command, WAIT_S) == {"applied": False}
    end = client.progress_reports[token][-1]
    assert isinstance(end, lsp.WorkDoneProgressEnd) and "cancelled" in end.message
    assert client.edits == []
    # The caller is answered at once; the record is written when the model thread lets go.
    st = await until_stats(client, lambda st: jobs_of(st, uri), "the cancelled job to finish")
    (job,) = jobs_of(st, uri)
    assert job["outcome"] == "cancelled" and job["ran"]
    assert job["forwards_after_cancel"] <= 1
    assert job["forwards"] < 50  # stopped long before the end


@aio
async def test_cancel_request_on_a_command_stops_its_job(mechanic):
    """VS Code cancels a command's notification with $/cancelRequest for the executeCommand."""
    client = mechanic
    uri = open_doc(client, SAMPLE)
    client.edits.clear()
    tokens_before = set(client.progress_reports)
    msg_id = f"command-{uuid.uuid4().hex[:6]}"
    arg = {"textDocument": {"uri": uri},
           "range": {"start": {"line": 4, "character": 0}, "end": {"line": 20, "character": 0}}}
    command = asyncio.ensure_future(client.protocol.send_request_async(
        lsp.WORKSPACE_EXECUTE_COMMAND, lsp.ExecuteCommandParams(command=server_mod.CMD_REFINE, arguments=[arg]),
        msg_id=msg_id))
    token = await reporting_token(client, tokens_before)
    client.protocol.notify(lsp.CANCEL_REQUEST, lsp.CancelParams(id=msg_id))
    with pytest.raises(JsonRpcRequestCancelled):
        await asyncio.wait_for(command, WAIT_S)
    st = await until_stats(client, lambda st: jobs_of(st, uri), "the cancelled job to finish")
    (job,) = jobs_of(st, uri)
    assert job["outcome"] == "cancelled" and job["forwards_after_cancel"] <= 1 and job["forwards"] < 50
    end = await until(lambda: isinstance(client.progress_reports[token][-1], lsp.WorkDoneProgressEnd)
                      and client.progress_reports[token][-1], "the progress to end")
    assert end.message == "cancelled (the request was cancelled)"
    assert client.edits == []


@aio
async def test_cancel_request_stops_the_job(scratch):
    client = scratch
    await configure(client, SLOW)
    uri = open_doc(client, SAMPLE)
    msg_id = f"to-cancel-{uuid.uuid4().hex[:6]}"
    request = asyncio.ensure_future(client.protocol.send_request_async(
        lsp.TEXT_DOCUMENT_INLINE_COMPLETION, lsp.InlineCompletionParams(
            text_document=lsp.TextDocumentIdentifier(uri=uri), position=end_of(SAMPLE),
            context=lsp.InlineCompletionContext(trigger_kind=lsp.InlineCompletionTriggerKind.Invoked)),
        msg_id=msg_id))
    await until_stats(client, lambda st: st["running"] is not None, "the job to start")
    client.protocol.notify(lsp.CANCEL_REQUEST, lsp.CancelParams(id=msg_id))
    with pytest.raises(JsonRpcRequestCancelled):
        await asyncio.wait_for(request, WAIT_S)
    st = await until_stats(client, lambda st: jobs_of(st, uri), "the cancelled job to finish")
    (job,) = jobs_of(st, uri)
    assert job["outcome"] == "cancelled" and job["ran"] and job["forwards_after_cancel"] <= 1


# ------------------------------------------------------------------ bad input

@aio
async def test_malformed_params_get_invalid_params(client):
    with pytest.raises(JsonRpcException) as caught:
        await raw_request(client, lsp.TEXT_DOCUMENT_INLINE_COMPLETION,
                          {"textDocument": {"uri": 5}, "position": "end of file"})
    assert caught.value.code == JsonRpcInvalidParams.CODE
    with pytest.raises(JsonRpcException) as caught:
        await raw_request(client, lsp.TEXT_DOCUMENT_COMPLETION, None)
    assert caught.value.code == JsonRpcInvalidParams.CODE
    with pytest.raises(JsonRpcException) as caught:  # a command with the wrong argument shape
        await execute(client, server_mod.CMD_FILL_HOLES, textDocument="nope")
    assert caught.value.code == JsonRpcInvalidParams.CODE
    # Bad notifications are dropped quietly: no answer is due, the server carries on.
    client.protocol._send_data({"jsonrpc": "2.0", "method": lsp.TEXT_DOCUMENT_DID_OPEN, "params": {"x": 1}})
    assert (await stats(client))["model_state"] == "ready"


@aio
async def test_unknown_method_gets_method_not_found(client):
    with pytest.raises(JsonRpcMethodNotFound):
        await client.protocol.send_request_async("diffu/noSuchMethod", {"x": 1})
    with pytest.raises(JsonRpcException):
        await client.workspace_execute_command_async(lsp.ExecuteCommandParams(command="diffu.nope", arguments=[]))


@aio
async def test_unknown_uri_gets_an_empty_answer(client):
    uri = "file:///virtual/never-opened.py"
    assert nothing_here(await inline(client, uri, lsp.Position(line=0, character=0)))
    assert not await code_actions(client, uri, rng(0, 0, 0, 0))
    assert await execute(client, server_mod.CMD_COMPLETE_BLOCK, textDocument={"uri": uri},
                         position={"line": 0, "character": 0}) == {"applied": False}


@aio
async def test_positions_past_the_end_are_clamped(client):
    text = 'name = "héllo"\nx = '
    uri = open_doc(client, text)
    # Past the end of line 0 (in UTF-8 units, the negotiated encoding): clamped to its end.
    actions = await code_actions(client, uri, rng(0, 500, 0, 500), only=[server_mod.KIND_COMPLETE_BLOCK])
    assert plain(actions[0].command.arguments)[0]["position"] == {"line": 0, "character": len('name = "héllo"'.encode())}
    # Past the last line: an empty answer, never an item clamped onto another line.
    assert nothing_here(await inline(client, uri, lsp.Position(line=99, character=99)))
    assert nothing_here(await inline(client, uri, lsp.Position(line=2, character=0)))
    assert not await code_actions(client, uri, rng(99, 0, 99, 9), only=[server_mod.KIND_COMPLETE_BLOCK])
    # A range that ends past the end (select all) ends at the end of the document.
    actions = await code_actions(client, uri, rng(1, 0, 99, 0), only=[server_mod.KIND_REFINE])
    assert plain(actions[0].command.arguments)[0]["range"]["end"] == {"line": 1, "character": 4}


@aio
async def test_binary_content_gets_an_empty_answer(client):
    text = "data = b'\x00\x01\x02'\nvalue = "
    uri = open_doc(client, text)
    before = await stats(client)
    assert nothing_here(await inline(client, uri, end_of(text)))
    assert not await code_actions(client, uri, rng(0, 0, 1, 3))
    assert (await stats(client))["submitted"] == before["submitted"]


@aio
async def test_huge_document_is_windowed(client):
    body = "def f{0}(x):\n    return x + {0}\n\n\n"
    text = "".join(body.format(i) for i in range(150_000))  # about 4.6 MB, over maxDocumentBytes
    assert len(text) > 4_000_000
    text += "def last(x):\n    return "
    uri = open_doc(client, text)
    started = time.monotonic()
    before = await stats(client)
    await inline(client, uri, end_of(text))  # a suggestion or None; either way answered
    st = await stats(client)
    (job,) = jobs_of(st, uri)
    assert job["outcome"] == "completed" and job["forwards"] >= 1
    assert st["documents_clipped"] == before["documents_clipped"] + 1  # the model saw a window, not 4.6 MB
    assert time.monotonic() - started < WAIT_S
    client.text_document_did_close(lsp.DidCloseTextDocumentParams(text_document=lsp.TextDocumentIdentifier(uri=uri)))


@aio
async def test_server_survives_bad_input(client):
    """After bad input of every kind, the shared server still answers with the model."""
    with pytest.raises(JsonRpcException):
        await raw_request(client, lsp.TEXT_DOCUMENT_INLINE_COMPLETION, {"textDocument": {"uri": 5}, "position": "x"})
    client.protocol._send_data({"jsonrpc": "2.0", "method": lsp.TEXT_DOCUMENT_DID_OPEN, "params": {"x": 1}})
    client.protocol._send_data({"jsonrpc": "2.0", "id": "bad", "method": 7})
    assert nothing_here(await inline(client, "file:///virtual/never-opened.py", lsp.Position(line=0, character=0)))
    binary = "data = b'\x00'\nvalue = "
    assert nothing_here(await inline(client, open_doc(client, binary), end_of(binary)))
    await model_suggestion(client)
    assert client.error is None


# ------------------------------------------------------------------ settings

@pytest_asyncio.fixture(loop_scope="module")
async def configured(tmp_path):
    user = tmp_path / "xdg" / "diffu-lsp" / "diffu-lsp.toml"
    user.parent.mkdir(parents=True)
    user.write_text("threshold = 0.5\nsingle_line_tokens = 20\n")
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "diffu-lsp.toml").write_text("singleLineTokens = 24\nprefixTokens = 300\n")
    c = await start_server(tmp_path, init_options={"diffu": {"debounceMs": 30, "prefixTokens": 400}},
                           configuration={"suffixTokens": 100})
    c.user_toml, c.workspace_toml = user, tmp_path / "ws" / "diffu-lsp.toml"
    await wait_status(c, "ready")
    yield c
    await stop_server(c)


@aio
async def test_settings_layers_and_invalid_values(configured):
    client = configured
    s = (await stats(client))["settings"]
    # defaults < user TOML < workspace TOML < initializationOptions < workspace/configuration
    assert (s["threshold"], s["singleLineTokens"], s["prefixTokens"], s["debounceMs"], s["suffixTokens"]) == (
        0.5, 24, 400, 30, 100)
    assert client.init_result.capabilities.position_encoding == lsp.PositionEncodingKind.Utf16  # nothing offered

    # An invalid value: a warning that names the key, and the previous value stays.
    client.messages.clear()
    client.set_configuration({"suffixTokens": 100, "steps": 0}, section="diffu")
    client.workspace_did_change_configuration(lsp.DidChangeConfigurationParams(settings=None))
    warning = await until(lambda: [m for m in client.messages if "steps" in m.message], "a warning about steps")
    assert warning[0].type == lsp.MessageType.Warning and ">= 1" in warning[0].message
    assert (await stats(client))["settings"]["steps"] is None

    # A changed TOML file is re-applied live; an invalid value in it keeps the old one.
    client.user_toml.write_text("threshold = 0.7\n")
    deadline = time.monotonic() + WAIT_S
    while (await stats(client))["settings"]["threshold"] != 0.7:
        assert time.monotonic() < deadline, "the changed user TOML was not re-applied"
        await asyncio.sleep(0.1)
    client.messages.clear()
    client.user_toml.write_text("threshold = 7\n")
    warning = await until(lambda: [m for m in client.messages if "threshold" in m.message], "a threshold warning")
    assert warning[0].type == lsp.MessageType.Warning
    assert (await stats(client))["settings"]["threshold"] == 0.7
    client.workspace_toml.write_text("singleLineTokens = 24\nblockTokens = 50\n")  # the other file too
    await until_stats(client, lambda st: st["settings"]["blockTokens"] == 50, "the workspace TOML change")
    client.messages.clear()
    client.user_toml.write_text("threshold = [oops\n")
    await until(lambda: [m for m in client.messages if "Invalid TOML" in m.message], "an invalid TOML warning")
    assert (await stats(client))["settings"]["threshold"] == 0.7


@aio
async def test_model_setting_change_reloads_in_the_background(configured, tmp_path):
    client = configured
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "not-a-diffusion-model"}))
    seen = len(client.statuses)
    client.messages.clear()
    await configure(client, {"suffixTokens": 100, "model": str(broken)})
    error = await wait_status(client, "error", after=seen)
    assert "not-a-diffusion-model" in error["message"]
    shown = await until(lambda: [m for m in client.messages if m.type == lsp.MessageType.Error], "an error message")
    assert "could not load the model" in shown[0].message
    uri = open_doc(client, SAMPLE)
    assert nothing_here(await inline(client, uri, end_of(SAMPLE)))  # no model: empty, not an error
    seen = len(client.statuses)
    await configure(client, {"suffixTokens": 100, "model": None})
    await wait_status(client, "ready", after=seen)
    st = await stats(client)
    assert st["model_loads"] == 2 and st["model_load_failures"] == 1


@aio
async def test_model_folder_that_fails_to_load(tmp_path):
    broken = tmp_path / "half-written"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "Dream", ')  # truncated
    client = await start_server(tmp_path, "--model", str(broken))
    try:
        error = await wait_status(client, "error")
        assert error["model"] == str(broken)
        await until(lambda: [m for m in client.messages if m.type == lsp.MessageType.Error], "an error message")
        uri = open_doc(client, SAMPLE)
        assert nothing_here(await inline(client, uri, end_of(SAMPLE)))
        assert await execute(client, server_mod.CMD_COMPLETE_BLOCK, textDocument={"uri": uri},
                             position={"line": 0, "character": 0}) == {"applied": False}
        assert (await stats(client))["model_state"] == "error"
    finally:
        await stop_server(client)


# ------------------------------------------------------------------ in-process units

def test_handlers_are_module_functions_over_the_session():
    from diffu_lsp.session import Shown

    ls = server_mod.DiffuServer(daemon=False)
    uri = "file:///a.py"
    ls.session.shown[uri] = Shown("x = ", "", "1", 0)
    doc = lsp.VersionedTextDocumentIdentifier(uri=uri, version=2)
    server_mod.did_change(ls, lsp.DidChangeTextDocumentParams(text_document=doc, content_changes=[]))
    assert ls.session.sched.is_current(uri, 2) and not ls.session.sched.is_current(uri, 1)
    assert uri in ls.session.shown  # typing through a suggestion keeps it
    server_mod.did_close(ls, lsp.DidCloseTextDocumentParams(text_document=lsp.TextDocumentIdentifier(uri=uri)))
    assert uri not in ls.session.shown
    assert {method for method, _, _ in server_mod.FEATURES} >= {lsp.TEXT_DOCUMENT_INLINE_COMPLETION, server_mod.STATS}


def test_the_guard_turns_errors_into_answers_by_type():
    import asyncio

    from diffu_lsp import errors
    from diffu_lsp.errors import DaemonStuck, OutOfMemory

    ls = server_mod.DiffuServer(daemon=False)
    shown = []
    ls.show = lambda message, kind: shown.append(message)
    ls.log_client = lambda message, kind=None: shown.append(message)

    def answer(error):
        async def handler(ls, params):
            raise error
        return asyncio.run(server_mod.guarded("empty")(handler)(ls, None))

    assert answer(DaemonStuck("silent for 10 s")) == "empty" and not shown  # a lost engine: answered empty, quietly
    assert answer(OutOfMemory("the daemon ran out")) == "empty"
    assert ls.session.counters["oom_failures"] == 1 and "out of memory" in shown[-1]
    assert answer(errors.ModelLoadFailed("no model is loaded")) == "empty" and "no model is loaded" in shown[-1]


def test_oom_retry_uses_a_smaller_hole_once():
    from torch import OutOfMemoryError  # what torch raises, recognised by type (errors.is_out_of_memory)

    settings = server_mod.Settings()
    calls = []

    def run(s):
        calls.append(s)
        if len(calls) == 1:
            raise OutOfMemoryError("CUDA out of memory")
        return "ok"

    assert features.retry_on_oom(run, settings) == "ok"
    assert calls[1].single_line_tokens == settings.single_line_tokens // 2
    assert calls[1].prefix_tokens == settings.prefix_tokens // 2

    def always(s):
        raise OutOfMemoryError("still")

    with pytest.raises(OutOfMemoryError):
        features.retry_on_oom(always, settings)
    with pytest.raises(ValueError):  # anything else is not retried
        features.retry_on_oom(lambda s: (_ for _ in ()).throw(ValueError("x")), settings)


@aio
async def test_tcp_on_loopback(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        *server_command("--tcp", f"127.0.0.1:{port}"), stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"})
    client = make_client()
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                await client.start_tcp("127.0.0.1", port)
                break
            except OSError:
                assert process.returncode is None and time.monotonic() < deadline, "no TCP server"
                await asyncio.sleep(0.2)
        result = await client.initialize_session(lsp.InitializeParams(capabilities=capabilities()))
        assert result.server_info.name == "diffu-lsp"
        await client.shutdown_session()
        assert await asyncio.wait_for(process.wait(), WAIT_S) == 0  # exit after shutdown: status 0
    finally:
        if process.returncode is None:
            process.kill()
        await client.stop()


def test_tcp_only_on_loopback():
    assert server_mod.parse_tcp("127.0.0.1:2087") == ("127.0.0.1", 2087)
    assert server_mod.parse_tcp("[::1]:2087") == ("::1", 2087)
    assert server_mod.parse_tcp("localhost:9") == ("localhost", 9)
    for bad in ("0.0.0.0:2087", "192.168.1.4:2087", "example.com:2087", "127.0.0.1", "127.0.0.1:http", ":2087"):
        with pytest.raises(ValueError):
            server_mod.parse_tcp(bad)
    assert server_mod.serve(tcp="0.0.0.0:2087") == 2


def test_documents_break_lines_like_lsp():
    """Form feeds and U+2028 are not line breaks in LSP (pygls's splitlines says they are)."""
    from diffu_lsp.documents import offset_at, position_at
    from diffu_lsp.pygls_adapter import LspTextDocument

    doc = LspTextDocument("file:///x.py", "a\x0cb\nc\u2028d\r\ne\rf")
    assert doc.lines == ("a\x0cb\n", "c\u2028d\r\n", "e\r", "f")
    doc.apply_change(lsp.TextDocumentContentChangePartial(range=rng(1, 0, 1, 1), text="C"))
    assert doc.source == "a\x0cb\nC\u2028d\r\ne\rf"
    assert position_at(doc, [len(doc.source)]) == [lsp.Position(line=3, character=1)]
    assert offset_at(doc, lsp.Position(line=1, character=99)) == (
        len("a\x0cb\nC\u2028d"), lsp.Position(line=1, character=3))
