// The extension in a real VS Code workbench: code-server (VS Code 1.100 for the browser, with a
// real Node extension host) runs the packaged extension, which starts the real `diffu-lsp`; headless
// Chromium, driven by playwright-core, types into a Python file and reads what the workbench draws.
// Run by tests/test_vscode_workbench.py (which writes the config and asserts on the results);
// test/install-workbench.sh installs code-server, playwright-core and chromium.
//
//   node test/workbench.js CONFIG.json
//
// CONFIG: { codeServer (its package folder), playwright (playwright-core's folder), chromium,
// vsix, dir (an empty folder for this run), file, text, settings (the diffu.* ones), keybindings,
// acceptLineKey, env, checks, results, timeoutS }. Each check (ghost, toggle, restart, accept,
// cycle, draft, cancel) runs in turn; the results file gets { check: { ok, error?, ...what was seen } }
// after each one, screenshots (PNG) of a failed check go next to it. Exits 0 when the checks ran (passed or not), 1 when the workbench
// could not be set up.
'use strict';
const fs = require('fs');
const net = require('net');
const path = require('path');
const { spawn, execFileSync } = require('child_process');

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const { chromium } = require(cfg.playwright);
const ENTRY = path.join(cfg.codeServer, 'out', 'node', 'entry.js');
const TIMEOUT = (cfg.timeoutS || 120) * 1000;  // one answer from the server, or one step of the workbench
const log = (...a) => console.log(`[workbench ${new Date().toISOString().slice(11, 23)}]`, ...a);
const results = {};
const saveResults = () => fs.writeFileSync(cfg.results, JSON.stringify(results, null, 1));

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Poll `fn` until it returns something truthy; that value. */
async function until(fn, ms, what) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms / 1000} s waiting for ${what}`);
    await sleep(100);
  }
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.listen(0, '127.0.0.1', () => { const { port } = srv.address(); srv.close(() => resolve(port)); });
    srv.on('error', reject);
  });
}

// ------------------------------------------------------------------ code-server

const userDir = path.join(cfg.dir, 'user');
const extDir = path.join(cfg.dir, 'extensions');
const work = path.join(cfg.dir, 'work');
const file = path.join(work, cfg.file);
const env = {
  ...process.env, ...cfg.env,
  // code-server's own config and logs stay in this run's folder, out of the user's home
  XDG_CONFIG_HOME: path.join(cfg.dir, 'xdg-config'), XDG_DATA_HOME: path.join(cfg.dir, 'xdg-data'),
};

function prepare() {
  for (const d of [path.join(userDir, 'User'), path.join(userDir, 'Machine'), extDir, work]) fs.mkdirSync(d, { recursive: true });
  // The extension's settings go in the remote machine's settings: a code-server window is a remote
  // window, where VS Code takes machine-scoped settings (diffu.server.command, diffu.model, ...)
  // from there only; from the user settings it drops them once it reloads them (after any write).
  fs.writeFileSync(path.join(userDir, 'Machine', 'settings.json'), JSON.stringify(cfg.settings, null, 1));
  fs.writeFileSync(path.join(userDir, 'User', 'settings.json'), JSON.stringify({
    'workbench.startupEditor': 'none',
    'telemetry.telemetryLevel': 'off',
    'update.mode': 'none',
    'extensions.autoCheckUpdates': false,
    'extensions.autoUpdate': false,
    'workbench.tips.enabled': false,
    'files.autoSave': 'off',
    'editor.inlineSuggest.showToolbar': 'always',  // the 1/N counter
  }, null, 1));
  fs.writeFileSync(path.join(userDir, 'User', 'keybindings.json'), JSON.stringify(cfg.keybindings || []));
  fs.writeFileSync(file, cfg.text);
  execFileSync(process.execPath, [ENTRY, '--user-data-dir', userDir, '--extensions-dir', extDir,
    '--config', path.join(cfg.dir, 'code-server.yaml'), '--install-extension', cfg.vsix],
  { env, stdio: ['ignore', 'inherit', 'inherit'], timeout: TIMEOUT });
}

async function startCodeServer() {
  const port = await freePort();
  const out = fs.openSync(path.join(cfg.dir, 'code-server.log'), 'w');
  // its own process group: the extension host and the language server go with it at the end
  const proc = spawn(process.execPath, [ENTRY, '--bind-addr', `127.0.0.1:${port}`, '--auth', 'none',
    '--disable-telemetry', '--disable-update-check', '--disable-workspace-trust',
    '--disable-getting-started-override', '--ignore-last-opened',
    '--user-data-dir', userDir, '--extensions-dir', extDir,
    '--config', path.join(cfg.dir, 'code-server.yaml'), work],
  { env, cwd: work, detached: true, stdio: ['ignore', out, out] });
  const url = `http://127.0.0.1:${port}/`;
  await until(() => fetch(url + 'healthz').then((r) => r.ok, () => false), TIMEOUT, `code-server on ${url}`);
  return { proc, url: `${url}?folder=${encodeURIComponent(work)}` };
}

// ------------------------------------------------------------------ the workbench, as a user sees it

let page;

/** The ghost text shown in the editor (the inline suggestion), '' when none: the part drawn after
 * the cursor on its line and the lines drawn below it, non-breaking spaces as spaces. VS Code draws
 * the two parts in separate renders, so a read in between mixed two suggestions (the first line of
 * the one shown before, the lines below of the next): the same text read twice, 100 ms apart. */
async function ghost() {
  let last = await drawnGhost();
  for (let i = 0; i < 50; i++) {
    await sleep(100);
    const now = await drawnGhost();
    if (now === last) return now;
    last = now;
  }
  return last;
}

/** The ghost text drawn now (see ghost). */
async function drawnGhost() {
  return page.evaluate(() => {
    const inline = [...document.querySelectorAll('.monaco-editor .view-line .ghost-text-decoration')]
      .map((e) => e.textContent).join('');
    const below = [...document.querySelectorAll('.monaco-editor .view-zones .suggest-preview-text .view-line')]
      .sort((a, b) => parseFloat(a.style.top) - parseFloat(b.style.top)).map((e) => e.textContent);
    return [inline, ...below].join('\n').replace(/\u00a0/g, ' ').replace(/\n+$/, '');
  });
}

/** The inline-suggestion toolbar's counter, e.g. "2/3", or ''. */
const counter = () => page.evaluate(() => {
  const e = document.querySelector('.inlineSuggestionsHints .availableSuggestionCount');
  return e ? e.textContent.trim() : '';
});
/** The counter once the toolbar is drawn (a moment after the ghost text). */
const shownCounter = () => until(counter, TIMEOUT, "the inline-suggestion toolbar's counter");

/** The texts of this extension's status-bar item. */
const diffuStatus = async () => (await page.locator('.statusbar-item').allInnerTexts())
  .map((s) => s.trim()).filter((s) => /^Diffu\b/.test(s)).join(' | ');

/** The notifications shown (toasts), their messages. */
const toasts = () => page.evaluate(() => [...document.querySelectorAll('.notifications-toasts .notification-list-item-message')]
  .map((e) => e.textContent.trim()));

/** Run a command from the palette by its title. */
async function palette(title) {
  await page.keyboard.press('F1');
  const input = page.locator('.quick-input-widget input');
  await input.waitFor({ state: 'visible', timeout: TIMEOUT });
  await input.fill('>' + title);
  const row = page.locator('.quick-input-list .monaco-list-row', { hasText: title }).first();
  await row.waitFor({ state: 'visible', timeout: TIMEOUT });
  await page.keyboard.press('Enter');
  await page.locator('.quick-input-widget').waitFor({ state: 'hidden', timeout: TIMEOUT });
}

/** Cursor to the end of `line` (1-based). */
async function endOfLine(line) {
  await page.keyboard.press('Control+G');
  await page.keyboard.type(String(line));
  await page.keyboard.press('Enter');
  await page.keyboard.press('End');
}

/** Save (Ctrl+S) and read the file from disk. */
async function saved() {
  await page.keyboard.press('Control+S');
  await until(() => page.evaluate(() => !document.querySelector('.tab.active.dirty')), TIMEOUT, 'the save');
  return fs.readFileSync(file, 'utf8');
}

/** Undo back to the file as it was at the start (and saved so). */
async function restore() {
  await page.keyboard.press('Escape');
  for (let i = 0; i < 50; i++) {
    if (await saved() === cfg.text) return;
    await page.keyboard.press('Control+Z');
  }
  throw new Error('could not undo back to the file as it was');
}

/** Open a new line after `line` and wait for ghost text there; the text, or '' if none came in `ms`. */
async function suggestAfter(line, ms = TIMEOUT) {
  await endOfLine(line);
  const t = Date.now();
  await page.keyboard.press('Enter');
  try {
    const text = await until(ghost, ms, `ghost text after line ${line}`);
    return { text, ms: Date.now() - t };
  } catch {
    return { text: '', ms: Date.now() - t };
  }
}

/** Positions tried in turn until the model offers something (as tests/test_nvim.py). */
const LINES = cfg.lines || [22, 19, 16, 12];

/** The first suggestion shown (at LINES in turn, each one's candidates in turn) that `fits`. */
async function someSuggestion(fits = async () => true) {
  const seen = [];
  for (const line of LINES) {
    const s = await suggestAfter(line);
    if (s.text && await fits(s.text)) return { ...s, line };
    // the other candidates on offer
    const n = s.text ? Number((await shownCounter()).split('/')[1]) : 0;
    for (let i = 1; i < n; i++) {
      await page.keyboard.press('Alt+BracketRight');
      await until(async () => (await counter()).startsWith(`${i + 1}/`), TIMEOUT, `candidate ${i + 1}`);
      const text = await ghost();
      if (await fits(text)) return { text, ms: s.ms, line };
      seen.push(text);
    }
    seen.push(s.text);
    await restore();
  }
  throw new Error(`no suggestion fit after lines ${LINES}: ${JSON.stringify(seen)}`);
}

// ------------------------------------------------------------------ the checks

/** `text` with `insert` at the end of its line `line` (0-based; there, the cursor on the line opened). */
function insertAt(text, line, insert) {
  const lines = text.split('\n');
  const at = lines.slice(0, line).reduce((n, l) => n + l.length + 1, 0) + lines[line].length;
  return text.slice(0, at) + insert + text.slice(at);
}

const checks = {
  /** Typing a new line shows ghost text from the server, with the extension's status "Diffu". */
  async ghost(r) {
    const s = await someSuggestion();
    Object.assign(r, { text: s.text, latencyMs: s.ms, line: s.line, status: await diffuStatus(), counter: await shownCounter(),
      dirty: await page.evaluate(() => !!document.querySelector('.tab.active.dirty')) });
    await restore();
  },

  /** Diffu: Toggle Suggestions turns suggestions off (status "Diffu: off", the user setting
   * written, no ghost text where there was some) and on again (ghost text there again). */
  async toggle(r) {
    const on = await someSuggestion();
    r.before = on.text;
    await restore();
    await palette('Diffu: Toggle Suggestions');
    r.statusOff = await until(async () => { const s = await diffuStatus(); return s.includes('Diffu: off') && s; }, TIMEOUT, 'status "Diffu: off"');
    r.settingOff = JSON.parse(fs.readFileSync(path.join(userDir, 'User', 'settings.json'), 'utf8'))['diffu.inlineCompletion'];
    // the server answers at once when off: 3 times the first answer's time, 5 s at least
    const wait = Math.max(5000, 3 * on.ms);
    const off = await suggestAfter(on.line, wait);
    r.whileOff = off.text;
    r.waitedMs = wait;
    await restore();
    await palette('Diffu: Toggle Suggestions');
    r.statusOn = await until(async () => { const s = await diffuStatus(); return !s.includes('off') && s; }, TIMEOUT, 'status without "off"');
    r.settingOn = JSON.parse(fs.readFileSync(path.join(userDir, 'User', 'settings.json'), 'utf8'))['diffu.inlineCompletion'];
    const again = await suggestAfter(on.line);
    r.after = again.text;
    await restore();
  },

  /** Diffu: Restart Server: the status goes through "Diffu: starting" back to "Diffu", and the new
   * server offers ghost text. */
  async restart(r) {
    r.seen = [await diffuStatus()];
    await palette('Diffu: Restart Server');
    await until(async () => {
      const s = await diffuStatus();
      if (s !== r.seen[r.seen.length - 1]) r.seen.push(s);
      return r.seen.length > 2 && s === 'Diffu';
    }, TIMEOUT, `the status back at "Diffu" (seen: ${JSON.stringify(r.seen)})`);
    r.after = (await someSuggestion()).text;
    await restore();
  },

  /** Ctrl+Right (VS Code's acceptNextWord) inserts the suggestion's next word and leaves the rest
   * shown; cfg.acceptLineKey (acceptNextLine) its next line; Tab the rest. A suggestion with a second line is looked for (positions, then its candidates). The
   * file is saved after each step; the test compares them. */
  async accept(r) {
    // a word, then more on its first line, then another line
    const s = await someSuggestion(async (t) => /^\s*\S+\s+\S.*\n\s*\S/.test(t));
    r.shown = s.text;
    r.line = s.line;
    r.opened = await saved();  // the new line, nothing accepted yet
    await until(ghost, TIMEOUT, 'the suggestion still shown after saving');
    await page.keyboard.press('Control+ArrowRight');
    r.afterWord = await until(async () => { const t = await saved(); return t !== r.opened && t; }, TIMEOUT, 'Ctrl+Right to insert a word');
    r.restAfterWord = await until(ghost, TIMEOUT, 'the rest shown after accepting a word');
    await page.keyboard.press(cfg.acceptLineKey);
    r.afterLine = await until(async () => { const t = await saved(); return t !== r.afterWord && t; }, TIMEOUT, 'the accept-line key to insert a line');
    r.restAfterLine = await until(ghost, TIMEOUT, 'the rest shown after accepting a line');
    // Tab: VS Code's own rule indents first where the cursor's indentation is less than a tab
    // and the suggestion's more (inlineSuggestionHasIndentationLessThanTabSize), then accepts
    // (until the file is the whole suggestion accepted: then a new one may be shown)
    const whole = insertAt(r.opened, s.line, s.text);
    r.tabs = [];
    for (let t = r.afterLine; t !== whole && (await ghost()) && r.tabs.length < 4;) {
      await page.keyboard.press('Tab');
      t = await until(async () => { const u = await saved(); return u !== t && u; }, TIMEOUT, 'Tab to insert something');
      r.tabs.push(t);
    }
    r.afterAll = r.tabs[r.tabs.length - 1];
    await restore();
  },

  /** Alt+] shows the next of the server's candidates (the counter says 2/N, another text), Alt+[
   * the previous, Tab accepts the one shown. */
  async cycle(r) {
    const s = await someSuggestion(async () => Number((await shownCounter()).split('/')[1]) >= 2);
    r.opened = await saved();
    r.first = s.text;
    r.counterFirst = await shownCounter();
    await page.keyboard.press('Alt+BracketRight');
    r.counterSecond = await until(async () => { const c = await counter(); return c.startsWith('2/') && c; }, TIMEOUT, 'the counter at 2/N');
    r.second = await until(async () => { const t = await ghost(); return t !== r.first && t; }, 5000, 'another text shown');
    await page.keyboard.press('Alt+BracketLeft');
    r.counterBack = await until(async () => { const c = await counter(); return c.startsWith('1/') && c; }, TIMEOUT, 'the counter back at 1/N');
    r.firstAgain = await ghost();
    await page.keyboard.press('Alt+BracketRight');
    await until(async () => (await counter()).startsWith('2/'), TIMEOUT, 'the counter at 2/N again');
    await page.keyboard.press('Tab');
    r.accepted = await until(async () => { const t = await saved(); return t !== cfg.text && t; }, TIMEOUT, 'Tab to accept the second');
    r.line = s.line;
    await restore();
  },

  /** Diffu: Complete Block on a slow model: its notification shows the draft (tokens still masked
   * as "…") while the job runs, before the edit lands in the document. */
  async draft(r) {
    await endOfLine(cfg.draftLine || 22);
    const before = await page.evaluate(() => document.querySelector('.monaco-editor .view-lines').textContent);
    const seen = [];
    let editedAt = 0;
    const watch = (async () => {
      const end = Date.now() + TIMEOUT;
      while (!editedAt && Date.now() < end) {
        for (const m of await toasts()) {
          if (seen.length && seen[seen.length - 1].text === m) continue;
          seen.push({ t: Date.now(), text: m });
          if (/tokens left/.test(m) && !seen.shot) seen.shot = page.screenshot({ path: path.join(path.dirname(cfg.results), 'draft.png') });
        }
        const now = await page.evaluate(() => document.querySelector('.monaco-editor .view-lines').textContent);
        if (now !== before) editedAt = Date.now();
        await sleep(50);
      }
    })();
    const started = Date.now();
    await palette('Diffu: Complete Block');
    await watch;
    await seen.shot;
    if (!editedAt) throw new Error(`the edit did not land in ${TIMEOUT / 1000} s; shown: ${JSON.stringify(seen)}`);
    r.seen = seen.map((e) => ({ ms: e.t - started, text: e.text }));
    r.editedMs = editedAt - started;
    r.after = await saved();
    await restore();
  },

  /** The same command cancelled from its notification's Cancel button, at its first draft: the
   * notification goes, and no edit lands in twice the time the whole job took in `draft` (or 10 s). */
  async cancel(r) {
    await endOfLine(cfg.draftLine || 22);
    await palette('Diffu: Complete Block');
    r.draft = await until(async () => (await toasts()).find((m) => /tokens left/.test(m)), TIMEOUT, 'a draft');
    await page.locator('.notifications-toasts .monaco-button', { hasText: 'Cancel' }).first().click();
    r.waitedMs = Math.max(10000, 2 * ((results.draft && results.draft.editedMs) || 0));
    await sleep(r.waitedMs);
    r.toasts = await toasts();
    r.after = await saved();
    await restore();
  },
};

// ------------------------------------------------------------------ main

async function main() {
  const t0 = Date.now();
  prepare();
  const server = await startCodeServer();
  let browser;
  try {
    browser = await chromium.launch({
      executablePath: cfg.chromium, headless: true, timeout: TIMEOUT,
      args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
        '--disable-component-update', '--disable-sync'],
    });
    page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    page.setDefaultTimeout(TIMEOUT);
    await page.goto(server.url);
    await page.locator('.monaco-workbench').waitFor({ timeout: TIMEOUT });
    // open the file (Quick Open), then wait for the model to be ready (the status bar's "Diffu")
    await until(async () => {
      await page.keyboard.press('Control+P');
      return page.locator('.quick-input-widget input').isVisible();
    }, TIMEOUT, 'Quick Open');
    await page.keyboard.type(cfg.file);
    await page.locator('.quick-input-list .monaco-list-row', { hasText: cfg.file }).first().waitFor();
    await page.keyboard.press('Enter');
    await page.locator('.monaco-editor .view-lines').first().waitFor();
    results.setup = { ok: true, status: await until(async () => { const s = await diffuStatus(); return s === 'Diffu' && s; }, TIMEOUT, 'the status bar\'s "Diffu" (model ready)'), ms: Date.now() - t0 };
    log('ready', results.setup);
    saveResults();
    for (const name of cfg.checks) {
      const r = (results[name] = { ok: false });
      const t = Date.now();
      try {
        await checks[name](r);
        r.ok = true;
      } catch (err) {
        r.error = String(err && err.stack || err);
        await page.screenshot({ path: path.join(path.dirname(cfg.results), `${name}.png`) }).catch(() => undefined);
        await page.keyboard.press('Escape').catch(() => undefined);
      }
      r.ms = Date.now() - t;
      log(name, r.ok ? 'ran' : 'failed', r.ms, 'ms', r.error || '');
      saveResults();
    }
  } catch (err) {
    results.setup = { ok: false, error: String(err && err.stack || err), ms: Date.now() - t0 };
    if (page) await page.screenshot({ path: path.join(path.dirname(cfg.results), 'setup.png') }).catch(() => undefined);
    saveResults();
    throw err;
  } finally {
    if (browser) await browser.close().catch(() => undefined);
    try { process.kill(-server.proc.pid, 'SIGTERM'); } catch { /* gone */ }
    await sleep(1000);
    try { process.kill(-server.proc.pid, 'SIGKILL'); } catch { /* gone */ }
  }
}

main().then(() => process.exit(0), (err) => { console.error(err); process.exit(1); });
