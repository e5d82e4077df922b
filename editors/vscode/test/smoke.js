// Runtime smoke test of the bundled extension (out/extension.js) without VS Code: a stub of the
// `vscode` API (enough for vscode-languageclient) activates the extension against a real
// `diffu-lsp` (on PATH, or SMOKE_SERVER=/path/to/diffu-lsp), waits for the status bar to show the
// model ready (diffu/status), then runs Refine Selection and Complete Block through the palette
// commands and checks that the server's workspace/applyEdit reached VS Code's workspace.applyEdit.
// Next edit: a rename typed into the document (didChange), then Diffu: Next Edit selects the other use.
// Then the Toggle Suggestions commands: the setting reaches the server (its "settings changed"
// log message), the status bar says "Diffu: off", an inline completion asked through the
// extension's provider is answered empty; on again, the status bar spins while one is in flight.
//
//   npm run bundle && node test/smoke.js            (SMOKE_VERBOSE=1 shows the server log;
//   SMOKE_MODEL=/path/to/checkpoint runs the server with --model)
const Module = require('module');
const path = require('path');
const log = (...a) => console.log('[smoke]', ...a);

function universal(name) {
  const fn = function () {};
  return new Proxy(fn, {
    get(t, p) {
      if (p === 'then') return undefined;
      if (p === Symbol.toPrimitive) return () => name;
      if (p === 'dispose') return () => {};
      return universal(name + '.' + String(p));
    },
    apply() { return universal(name + '()'); },
    construct() { return universal('new ' + name); },
  });
}
class Disposable { constructor(f) { this.f = f; } dispose() { this.f && this.f(); } static from(...d) { return new Disposable(() => d.forEach(x => x && x.dispose && x.dispose())); } }
class EventEmitter { constructor() { this.l = []; this.event = (f, thisArg) => { this.l.push(thisArg ? f.bind(thisArg) : f); return new Disposable(() => {}); }; } fire(e) { this.l.forEach(f => f(e)); } dispose() {} }
class Position { constructor(l, c) { this.line = l; this.character = c; } }
class Range { constructor(a, b, c, d) { if (typeof a === 'number') { this.start = new Position(a, b); this.end = new Position(c, d); } else { this.start = a; this.end = b; } } get isEmpty() { return this.start.line === this.end.line && this.start.character === this.end.character; } with(o) { return new Range(o.start || this.start, o.end || this.end); } contains() { return true; } }
class Selection extends Range { constructor(a, b) { super(a, b); this.active = b; this.anchor = a; } }
class Uri { constructor(s) { this.s = s; this.scheme = s.split(':')[0]; this.fsPath = s.replace('file://', ''); this.path = this.fsPath; } toString() { return this.s; } static parse(s) { return new Uri(s); } static file(p) { return new Uri('file://' + p); } }
class CancellationTokenSource { constructor() { const e = new EventEmitter(); this.token = { isCancellationRequested: false, onCancellationRequested: e.event }; this.e = e; } cancel() { this.token.isCancellationRequested = true; this.e.fire(); } dispose() {} }
class CodeActionKind { constructor(v) { this.value = v; } append(p) { return new CodeActionKind(this.value ? this.value + '.' + p : p); } contains(o) { return o.value.startsWith(this.value); } intersects() { return true; } }
['Empty:', 'QuickFix:quickfix', 'Refactor:refactor', 'RefactorExtract:refactor.extract', 'RefactorInline:refactor.inline', 'RefactorRewrite:refactor.rewrite', 'Source:source', 'SourceOrganizeImports:source.organizeImports', 'SourceFixAll:source.fixAll', 'RefactorMove:refactor.move', 'Notebook:notebook'].forEach(s => { const [k, v] = s.split(':'); CodeActionKind[k] = new CodeActionKind(v); });

const config = {};  // user-set values
const statusItems = [];
const commands = new Map();
const notifications = [];
let docText = process.env.SMOKE_TEXT || 'import os\n\n\ndef count_words(text):\n    words = text.split()\n    return len(words)\n\n\ndef count_lines(text):\n    ...\n';
const docUri = Uri.file(path.join(process.env.SMOKE_DIR || require('os').tmpdir(), 'diffu_smoke.py'));
const document = { uri: docUri, languageId: 'python', version: 1, getText: () => docText, get lineCount() { return docText.split('\n').length; }, isClosed: false, isUntitled: false, fileName: docUri.fsPath, lineAt: (l) => ({ range: new Range(l, 0, l, docText.split('\n')[l].length) }) };
const edits = [];
const outputLines = [];  // what reaches the output channel (the server's window/logMessage among it)
const configChanged = new EventEmitter();
const docChanged = new EventEmitter();  // the next-edit step types into the document
const statusMessages = [];
const inlineProviders = [];
class InlineCompletionItem { constructor(insertText, range, command) { this.insertText = insertText; this.range = range; this.command = command; } }
class InlineCompletionList { constructor(items) { this.items = items; } }

const base = {
  Disposable, EventEmitter, Position, Range, Selection, Uri, CancellationTokenSource, CodeActionKind,
  InlineCompletionItem, InlineCompletionList, InlineCompletionTriggerKind: { Invoke: 0, Automatic: 1 },
  ThemeColor: class { constructor(id) { this.id = id; } },
  StatusBarAlignment: { Left: 1, Right: 2 }, ProgressLocation: { SourceControl: 1, Window: 10, Notification: 15 },
  SymbolKind: { Function: 11, Method: 5, Constructor: 8 },
  TextEditorRevealType: { Default: 0, InCenter: 1, InCenterIfOutsideViewport: 2, AtTop: 3 },
  ConfigurationTarget: { Global: 1, Workspace: 2, WorkspaceFolder: 3 },
  version: '1.91.0',
  env: { language: 'en', appName: 'stub', machineId: 'x', sessionId: 'y', uiKind: 1 },
  window: {
    createOutputChannel: (name) => ({ name, append: (s) => process.env.SMOKE_VERBOSE && process.stdout.write(s), appendLine: (s) => { outputLines.push(s); process.env.SMOKE_VERBOSE && console.log('[out]', s); }, show() {}, dispose() {}, clear() {}, replace() {}, hide() {} , info: (s) => outputLines.push(s), warn: (s) => outputLines.push(s), error: (s)=>console.log('[out-err]', s), trace(){}, debug(){}, logLevel: 2, onDidChangeLogLevel: () => new Disposable() }),
    createStatusBarItem: (...a) => { const it = { text: '', show() {}, hide() {}, dispose() {} }; statusItems.push(it); return it; },
    showErrorMessage: async (m) => { notifications.push(['error', m]); log('ERROR MSG', m); },
    showWarningMessage: async (m) => { notifications.push(['warn', m]); log('WARN MSG', m); },
    showInformationMessage: async (m) => { notifications.push(['info', m]); log('INFO MSG', m); },
    withProgress: async (opts, task) => { const s = new CancellationTokenSource(); return task({ report: (v) => log('progress', JSON.stringify(v)) }, s.token); },
    activeTextEditor: { document, selection: new Selection(new Position(4, 4), new Position(5, 21)), revealRange() {} },
    setStatusBarMessage: (m) => { statusMessages.push(m); return new Disposable(); },
    visibleTextEditors: [], onDidChangeActiveTextEditor: () => new Disposable(), onDidChangeVisibleTextEditors: () => new Disposable(),
    createWindowProgress: undefined,
    tabGroups: { all: [], onDidChangeTabs: () => new Disposable() },
    onDidChangeWindowState: () => new Disposable(),
    state: { focused: true },
  },
  workspace: {
    getConfiguration: (section, scope) => ({
      get: (k, d) => { const key = section ? section + '.' + k : k; return key in config ? config[key] : d; },
      inspect: (k) => { const key = section ? section + '.' + k : k; return key in config ? { key, globalValue: config[key] } : { key }; },
      has: () => false,
      update: async (k, v) => {
        const key = section ? section + '.' + k : k;
        config[key] = v;
        configChanged.fire({ affectsConfiguration: (s) => key === s || key.startsWith(s + '.') });
      },
    }),
    workspaceFolders: undefined, textDocuments: [document], notebookDocuments: [],
    onDidChangeConfiguration: configChanged.event, onDidOpenTextDocument: () => new Disposable(), onDidCloseTextDocument: () => new Disposable(),
    onDidChangeTextDocument: docChanged.event, onDidSaveTextDocument: () => new Disposable(), onWillSaveTextDocument: () => new Disposable(),
    onDidChangeWorkspaceFolders: () => new Disposable(), onDidOpenNotebookDocument: () => new Disposable(), onDidCloseNotebookDocument: () => new Disposable(),
    onDidChangeNotebookDocument: () => new Disposable(), onDidSaveNotebookDocument: () => new Disposable(),
    onDidCreateFiles: () => new Disposable(), onDidRenameFiles: () => new Disposable(), onDidDeleteFiles: () => new Disposable(),
    onWillCreateFiles: () => new Disposable(), onWillRenameFiles: () => new Disposable(), onWillDeleteFiles: () => new Disposable(),
    createFileSystemWatcher: () => ({ onDidCreate: () => new Disposable(), onDidChange: () => new Disposable(), onDidDelete: () => new Disposable(), dispose() {} }),
    applyEdit: async (e) => { edits.push(e); log('applyEdit', JSON.stringify(e.__entries || e)); return true; },
    getWorkspaceFolder: () => undefined,
  },
  languages: new Proxy({ match: (sel, doc) => 10,
    registerInlineCompletionItemProvider: (sel, provider) => { inlineProviders.push(provider); return new Disposable(); }, onDidChangeDiagnostics: () => new Disposable(), createDiagnosticCollection: () => ({ set() {}, delete() {}, clear() {}, dispose() {} }) }, {
    get(t, p) { if (p in t) return t[p]; return (...a) => { log('languages.' + String(p)); return new Disposable(); }; },
  }),
  commands: {
    registerCommand: (id, fn) => { commands.set(id, fn); return new Disposable(() => commands.delete(id)); },
    executeCommand: async (id, ...args) => { if (commands.has(id)) return commands.get(id)(...args); return undefined; },
    getCommands: async () => [...commands.keys()],
  },
  extensions: { getExtension: () => undefined, all: [] },
  WorkspaceEdit: class { constructor() { this.__entries = []; } set(uri, e) { this.__entries.push([String(uri), e]); } replace(uri, r, t) { this.__entries.push([String(uri), r, t]); } insert(uri, p, t) { this.__entries.push([String(uri), p, t]); } delete() {} entries() { return this.__entries; } has() { return false; } size = 0; createFile() {} deleteFile() {} renameFile() {} },
  TextEdit: class { constructor(range, newText) { this.range = range; this.newText = newText; } static replace(r, t) { return new this(r, t); } static insert(p, t) { return new this(new Range(p, p), t); } },
};
const vscode = new Proxy(base, { get(t, p) { if (p in t) return t[p]; return universal('vscode.' + String(p)); } });

const origLoad = Module._load;
Module._load = function (request, parent, isMain) { if (request === 'vscode') return vscode; return origLoad.apply(this, arguments); };

(async () => {
  const ext = require(path.resolve(process.argv[2] || 'out/extension.js'));
  if (process.env.SMOKE_SERVER) config['diffu.server.command'] = process.env.SMOKE_SERVER;
  config['diffu.threshold'] = 0.8;
  if (process.env.SMOKE_MODEL) {  // e.g. a random-weight checkpoint: commands then always edit
    config['diffu.server.args'] = ['--model', process.env.SMOKE_MODEL];
    Object.assign(config, { 'diffu.algorithm': 'entropy', 'diffu.singleLineTokens': 8, 'diffu.multiLineTokens': 8, 'diffu.blockTokens': 8 });
  }
  const pkg = require(path.resolve('package.json'));
  const context = { subscriptions: [], extension: { packageJSON: pkg }, extensionPath: process.cwd(), asAbsolutePath: (p) => path.resolve(p) };
  const t0 = Date.now();
  await ext.activate(context);
  log('activated in', Date.now() - t0, 'ms; commands:', [...commands.keys()].filter(c => c.startsWith('diffu')).join(','));
  const sb = statusItems[0];
  const deadline = Date.now() + Number(process.env.SMOKE_TIMEOUT || 120000);
  while (!/\$\(sparkle\)|error/.test(sb.text) && Date.now() < deadline) await new Promise(r => setTimeout(r, 200));
  log('status bar:', JSON.stringify(sb.text), '| tooltip:', JSON.stringify(sb.tooltip));
  if (!/\$\(sparkle\)/.test(sb.text)) throw new Error('status bar never showed ready: ' + sb.text + ' / ' + sb.tooltip);
  for (const id of ['diffu.client.refineSelection', 'diffu.client.fillHoles', 'diffu.client.completeBlock', 'diffu.client.nextEdit', 'diffu.client.restartServer', 'diffu.client.showOutput']) {
    if (!commands.has(id)) throw new Error('command not registered: ' + id);
  }
  await commands.get('diffu.client.refineSelection')();
  log('after Refine Selection, edits applied via workspace.applyEdit:', edits.length);
  const afterRefine = edits.length;
  await commands.get('diffu.client.completeBlock')();
  log('after Complete Block, edits applied via workspace.applyEdit:', edits.length);
  // Fill Holes with an empty selection (the cursor in count_lines): the client sends it as it is
  // and the server decides it means the enclosing function.
  const beforeFill = edits.length;
  vscode.window.activeTextEditor.selection = new Selection(new Position(9, 2), new Position(9, 2));
  await commands.get('diffu.client.fillHoles')();
  const fillEdits = edits.slice(beforeFill);
  log('after Fill Holes (empty selection), edits:', fillEdits.length);
  if (process.env.SMOKE_MODEL) {
    if (fillEdits.length !== 1) throw new Error('Fill Holes with an empty selection applied ' + fillEdits.length + ' edits');
    const ranges = JSON.stringify(fillEdits[0].__entries);
    if (!/"line":9,"character":4\}.*"line":9,"character":7\}/.test(ranges)) throw new Error('Fill Holes did not replace the `...` of count_lines: ' + ranges);
  }

  // Next edit: rename `words` where it is assigned; Diffu: Next Edit (asked before the edit
  // settles, so the server predicts at once) selects its other use, `len(words)`.
  if (!process.env.SMOKE_TEXT) {
    const renamed = docText.replace('    words = ', '    tokens = ');
    const at = docText.indexOf('words = ');
    docText = renamed;
    document.version += 1;
    docChanged.fire({ document, reason: undefined, contentChanges: [
      { range: new Range(4, 4, 4, 9), rangeOffset: at, rangeLength: 5, text: 'tokens' }] });
    vscode.window.activeTextEditor.selection = new Selection(new Position(0, 0), new Position(0, 0));
    await commands.get('diffu.client.nextEdit')();
    const sel = vscode.window.activeTextEditor.selection;
    log('after Next Edit, selection:', JSON.stringify(sel), 'status:', JSON.stringify(statusMessages.slice(-1)));
    if (sel.start.line !== 5 || sel.start.character !== 15 || sel.end.character !== 20) throw new Error('Next Edit did not select len(words): ' + JSON.stringify(sel));
    if (!/next edit: words → tokens/.test(statusMessages[statusMessages.length - 1] || '')) throw new Error('Next Edit did not show the replacement: ' + JSON.stringify(statusMessages));
  }

  // Suggestions off and on: everywhere, then for the document's language.
  const inlineAt = async () => {  // through the extension's provider (and its middleware)
    const provider = inlineProviders[inlineProviders.length - 1];
    const source = new CancellationTokenSource();
    const pending = provider.provideInlineCompletionItems(document, new Position(5, 21), { triggerKind: 0 }, source.token);
    const during = sb.text;
    const result = await pending;
    return { during, items: Array.isArray(result) ? result : (result && result.items) || [] };
  };
  const serverSaid = async (pattern) => {  // a "settings changed" line after the last one seen
    const seen = outputLines.length;
    const found = () => outputLines.slice(seen).some((l) => /settings changed/.test(l) && pattern.test(l));
    const until = Date.now() + 60000;
    while (!found() && Date.now() < until) await new Promise(r => setTimeout(r, 100));
    if (!found()) throw new Error('the server never logged ' + pattern + ': ' + JSON.stringify(outputLines.slice(-5)));
  };
  for (const [id, key, off, on] of [
    ['diffu.client.toggleSuggestions', 'diffu.inlineCompletion', /inlineCompletion=False/, /inlineCompletion=True/],
    ['diffu.client.toggleSuggestionsForLanguage', 'diffu.disabledLanguages', /disabledLanguages=.*'python'/, /disabledLanguages=(\(\)|\[\])/],
  ]) {
    if (!commands.has(id)) throw new Error('command not registered: ' + id);
    const offSaid = serverSaid(off);
    await commands.get(id)();
    log(id, '->', JSON.stringify(config[key]), '| status bar:', JSON.stringify(sb.text));
    await offSaid;
    if (sb.text !== '$(circle-slash) Diffu: off') throw new Error('status bar does not say off: ' + sb.text);
    const answer = await inlineAt();
    if (answer.items.length) throw new Error('suggestions off, yet the server answered ' + JSON.stringify(answer.items));
    const onSaid = serverSaid(on);
    await commands.get(id)();
    await onSaid;
    const again = await inlineAt();
    log(id, 'on again: status bar while in flight', JSON.stringify(again.during), 'after', JSON.stringify(sb.text), 'items', again.items.length);
    if (again.during !== '$(loading~spin) Diffu') throw new Error('no spinner while a suggestion is in flight: ' + again.during);
    if (!/\$\(sparkle\)/.test(sb.text)) throw new Error('status bar not back to ready: ' + sb.text);
  }

  sb.text = '';
  await commands.get('diffu.client.restartServer')();
  const deadline2 = Date.now() + Number(process.env.SMOKE_TIMEOUT || 120000);
  while (!/\$\(sparkle\)|error/.test(sb.text) && Date.now() < deadline2) await new Promise(r => setTimeout(r, 200));
  log('after Restart Server, status bar:', JSON.stringify(sb.text));
  if (!/\$\(sparkle\)/.test(sb.text)) throw new Error('status bar not ready after Restart Server: ' + sb.text);
  await ext.deactivate();
  log('notifications:', JSON.stringify(notifications));
  const errors = notifications.filter(([k]) => k === 'error');
  if (errors.length) throw new Error('error messages shown: ' + JSON.stringify(errors));
  if (afterRefine < 1 && !notifications.some(([, m]) => /no change/.test(m))) throw new Error('Refine Selection neither applied an edit nor reported no change');
  if (process.env.SMOKE_MODEL && afterRefine < 1) throw new Error('Refine Selection applied no edit with SMOKE_MODEL');
  log('OK');
  process.exit(0);
})().catch((e) => { console.error('[smoke] FAILED', e); process.exit(1); });
