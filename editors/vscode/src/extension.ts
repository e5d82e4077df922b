// VS Code client for diffu-lsp.
//
// Thin on purpose: vscode-languageclient (v11) already provides inline completion (ghost text),
// completion, code actions, executeCommand, workspace/applyEdit and work-done progress. This file
// only starts the server, forwards the `diffu.*` settings, adds palette/context-menu commands that
// call the server's commands, and shows the model state the server sends (`diffu/status`) in the
// status bar, with a spinner while a suggestion is being computed. Suggestions as you type are
// turned off and on with the settings `diffu.inlineCompletion` and `diffu.disabledLanguages` (the
// server answers by them; the Toggle commands set them). Accepting a word or a line of a
// suggestion is VS Code's own (editor.action.inlineSuggest.acceptNextWord / acceptNextLine). What a command applies to is the server's decision: the commands send the selection
// as it is, and the server says what an empty one means (Refine: its line; Fill Holes: the enclosing function).

import * as fs from "node:fs";
import * as path from "node:path";
import * as vscode from "vscode";
import {
  CancellationToken,
  ConfigurationParams,
  DidChangeConfigurationNotification,
  ExecuteCommandParams,
  ExecuteCommandRequest,
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
  State,
  WorkDoneProgress,
} from "vscode-languageclient/node";

const SECTION = "diffu";
// Settings that belong to this client and are never sent to the server.
const CLIENT_ONLY_PREFIXES = ["server.", "trace."];

/** Languages the client attaches to; python first. */
export const LANGUAGES = [
  "python",
  "javascript",
  "javascriptreact",
  "typescript",
  "typescriptreact",
  "rust",
  "go",
  "c",
  "cpp",
  "java",
  "lua",
  "shellscript",
];

// Server command ids (registered by the language client itself from executeCommandProvider).
const SERVER_COMMANDS = {
  completeBlock: "diffu.completeBlock",
  fillHoles: "diffu.fillHoles",
  refineSelection: "diffu.refineSelection",
  nextEdit: "diffu.nextEdit",
} as const;

type ModelState = "starting" | "loading" | "ready" | "error" | "stopped" | "stuck" | "restarting";

interface DiffuStatusParams {
  // stuck: the model daemon does not answer; restarting: it is being replaced
  state: "loading" | "ready" | "error" | "stuck" | "restarting";
  model?: string;
  message?: string;
}

let client: LanguageClient | undefined;
let statusBar: vscode.StatusBarItem | undefined;
let serverKeys: string[] = [];
// The last diffu/status (or client state), and the inline-completion requests in flight.
let lastStatus: { state: ModelState; model?: string; message?: string } = { state: "starting" };
let inFlight = 0;

// ------------------------------------------------------------------ server command resolution

function isExecutable(file: string): boolean {
  try {
    const st = fs.statSync(file);
    if (!st.isFile()) {
      return false;
    }
    if (process.platform === "win32") {
      return true;
    }
    fs.accessSync(file, fs.constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** Look a program up on PATH (with PATHEXT on Windows). */
export function which(program: string, envPath = process.env.PATH ?? ""): string | undefined {
  if (program.includes("/") || program.includes("\\")) {
    return isExecutable(program) ? program : undefined;
  }
  const exts =
    process.platform === "win32"
      ? ["", ...(process.env.PATHEXT ?? ".EXE;.CMD;.BAT").split(";").map((e) => e.toLowerCase())]
      : [""];
  for (const dir of envPath.split(path.delimiter)) {
    if (!dir) {
      continue;
    }
    for (const ext of exts) {
      const candidate = path.join(dir, program + ext);
      if (isExecutable(candidate)) {
        return candidate;
      }
    }
  }
  return undefined;
}

function workspaceVenvServer(): string | undefined {
  const bin = process.platform === "win32" ? path.join("Scripts", "diffu-lsp.exe") : path.join("bin", "diffu-lsp");
  for (const folder of vscode.workspace.workspaceFolders ?? []) {
    if (folder.uri.scheme !== "file") {
      continue;
    }
    for (const venv of [".venv", "venv"]) {
      const candidate = path.join(folder.uri.fsPath, venv, bin);
      if (isExecutable(candidate)) {
        return candidate;
      }
    }
  }
  return undefined;
}

/**
 * `diffu.server.command` if set; else `diffu-lsp` on PATH; else a workspace `.venv`'s
 * `diffu-lsp` (a trusted workspace only: it is the workspace's own program); else
 * `diffu.server.python -m diffu_lsp`. In an untrusted workspace VS Code hides the workspace's
 * values of the `server.*` settings (package.json restrictedConfigurations).
 */
function resolveServer(): { command: string; args: string[] } {
  const cfg = vscode.workspace.getConfiguration(SECTION);
  const extraArgs = cfg.get<string[]>("server.args") ?? [];
  const configured = (cfg.get<string>("server.command") ?? "").trim();
  if (configured) {
    return { command: configured, args: extraArgs };
  }
  const onPath = which("diffu-lsp") ?? (vscode.workspace.isTrusted ? workspaceVenvServer() : undefined);
  if (onPath) {
    return { command: onPath, args: extraArgs };
  }
  const python = (cfg.get<string>("server.python") ?? "").trim() || (process.platform === "win32" ? "python" : "python3");
  return { command: python, args: ["-m", "diffu_lsp", ...extraArgs] };
}

// ------------------------------------------------------------------ settings

/**
 * The `diffu.*` values the user actually set (any scope), keyed as the server expects
 * (`topP`, `holeMarkers`, ...). Unset keys are left out so that the server's own defaults and any
 * project `diffu-lsp.toml` keep applying; the package.json defaults only document them.
 * In an untrusted workspace the workspace's values of the restricted settings (model, device,
 * engine, ...) are left out: `inspect` shows them even where VS Code's `get` would not.
 */
/** Settings a workspace may set only when trusted (package.json restrictedConfigurations). */
const RESTRICTED = new Set(["model", "device", "engine", "engineTokenFile", "allowDownload"]);

function serverSettings(scope?: vscode.ConfigurationScope | null): Record<string, unknown> {
  const cfg = vscode.workspace.getConfiguration(SECTION, scope);
  const out: Record<string, unknown> = {};
  for (const key of serverKeys) {
    const i = cfg.inspect(key);
    if (!i) {
      continue;
    }
    const fromWorkspace = vscode.workspace.isTrusted || !RESTRICTED.has(key);
    const value =
      (fromWorkspace
        ? (i.workspaceFolderLanguageValue ?? i.workspaceFolderValue ?? i.workspaceLanguageValue ?? i.workspaceValue)
        : undefined) ??
      i.globalLanguageValue ??
      i.globalValue;
    if (value !== undefined) {
      out[key] = value;
    } else if (
      // an explicit `null` (e.g. "diffu.model": null) is a choice too
      (fromWorkspace && (i.workspaceFolderValue === null || i.workspaceValue === null)) ||
      i.globalValue === null
    ) {
      out[key] = null;
    }
  }
  return out;
}

function serverKeysFrom(context: vscode.ExtensionContext): string[] {
  const props = (context.extension.packageJSON?.contributes?.configuration?.properties ?? {}) as Record<string, unknown>;
  return Object.keys(props)
    .filter((k) => k.startsWith(SECTION + "."))
    .map((k) => k.slice(SECTION.length + 1))
    .filter((k) => !CLIENT_ONLY_PREFIXES.some((p) => k.startsWith(p)));
}

// ------------------------------------------------------------------ status bar

/** Whether suggestions as you type are on for `languageId` (settings inlineCompletion and
 * disabledLanguages, as the server decides by them). */
export function suggestionsOn(languageId: string | undefined): boolean {
  const cfg = vscode.workspace.getConfiguration(SECTION);
  const disabled = cfg.get<string[]>("disabledLanguages", []) ?? [];
  return cfg.get<boolean>("inlineCompletion", true) !== false && !(languageId && disabled.includes(languageId));
}

function setStatus(state: ModelState, model?: string, message?: string): void {
  lastStatus = { state, model, message };
  if (!statusBar) {
    return;
  }
  const icon: Record<ModelState, string> = {
    starting: "$(loading~spin)",
    loading: "$(loading~spin)",
    ready: "$(sparkle)",
    error: "$(error)",
    stopped: "$(circle-slash)",
    stuck: "$(warning)",
    restarting: "$(sync~spin)",
  };
  const label: Record<ModelState, string> = {
    starting: "Diffu: starting",
    loading: "Diffu: loading",
    ready: "Diffu",
    error: "Diffu: error",
    stopped: "Diffu: stopped",
    stuck: "Diffu: not responding",
    restarting: "Diffu: restarting",
  };
  const languageId = vscode.window.activeTextEditor?.document.languageId;
  const off = state === "ready" && !suggestionsOn(languageId);
  statusBar.text =
    off ? "$(circle-slash) Diffu: off"
    : state === "ready" && inFlight > 0 ? "$(loading~spin) Diffu"
    : `${icon[state] ?? "$(question)"} ${label[state] ?? `Diffu: ${state}`}`;
  const lines = [`diffu-lsp: ${state}`];
  if (off) {
    lines.push(`suggestions as you type are off${languageId ? ` for ${languageId}` : ""} (Diffu: Toggle Suggestions)`);
  }
  if (model) {
    lines.push(`model: ${model}`);
  }
  if (message) {
    lines.push(message);
  }
  lines.push("", "Click to show the server output");
  statusBar.tooltip = lines.join("\n");
  statusBar.backgroundColor =
    state === "error" ? new vscode.ThemeColor("statusBarItem.errorBackground")
    : state === "stuck" ? new vscode.ThemeColor("statusBarItem.warningBackground")
    : undefined;
  statusBar.show();
}

// ------------------------------------------------------------------ client

function refreshStatus(): void {
  setStatus(lastStatus.state, lastStatus.model, lastStatus.message);
}

function createClient(context: vscode.ExtensionContext): LanguageClient {
  const server = resolveServer();
  const serverOptions: ServerOptions = {
    run: { command: server.command, args: server.args },
    debug: { command: server.command, args: server.args },
  };
  const documentSelector = LANGUAGES.flatMap((language) => [
    { scheme: "file", language },
    { scheme: "untitled", language },
  ]);
  let self: LanguageClient | undefined;

  const clientOptions: LanguageClientOptions = {
    documentSelector,
    // the server lets a trusted workspace's diffu-lsp.toml choose the model (workspaceTrusted)
    initializationOptions: { ...serverSettings(), workspaceTrusted: vscode.workspace.isTrusted },
    synchronize: { configurationSection: SECTION },
    middleware: {
      // the status bar's spinner while a suggestion is being computed
      provideInlineCompletionItems: async (document, position, context, token, next) => {
        inFlight += 1;
        refreshStatus();
        try {
          return await next(document, position, context, token);
        } finally {
          inFlight -= 1;
          refreshStatus();
        }
      },
      workspace: {
        // Push only the server's keys that the user set (not `diffu.server.*` / `diffu.trace.*`,
        // not the package.json defaults); the server pulls workspace/configuration on it anyway.
        didChangeConfiguration: async () => {
          await self?.sendNotification(DidChangeConfigurationNotification.type, {
            settings: { [SECTION]: serverSettings() },
          });
        },
        // Answer workspace/configuration for `diffu` with the explicitly set, server-side keys only.
        configuration: async (params: ConfigurationParams, token: CancellationToken, next) => {
          const results: unknown[] = [];
          for (const item of params.items) {
            if (item.section === SECTION) {
              const scope = item.scopeUri ? vscode.Uri.parse(item.scopeUri) : undefined;
              results.push(serverSettings(scope));
              continue;
            }
            const r = await next({ items: [item] }, token);
            results.push(Array.isArray(r) ? r[0] : null);
          }
          return results;
        },
      },
    },
  };

  const c = new LanguageClient("diffu", "Diffu LSP", serverOptions, clientOptions);
  self = c;
  context.subscriptions.push(
    c.onNotification("diffu/status", (p: DiffuStatusParams) => {
      setStatus(p.state, p.model, p.message);
      if (p.state === "error" && p.message) {
        void vscode.window.showErrorMessage(`Diffu: ${p.message}`, "Show Output").then((choice) => {
          if (choice) {
            c.outputChannel.show(true);
          }
        });
      }
    }),
    c.onDidChangeState((e) => {
      if (e.newState === State.Starting) {
        setStatus("starting");
      } else if (e.newState === State.Stopped) {
        setStatus("stopped");
      }
    }),
  );
  return c;
}

async function startClient(context: vscode.ExtensionContext): Promise<void> {
  client = createClient(context);
  setStatus("starting");
  try {
    await client.start();
  } catch (err) {
    const server = resolveServer();
    setStatus("error", undefined, String(err));
    void vscode.window
      .showErrorMessage(
        `Diffu: could not start the language server (${[server.command, ...server.args].join(" ")}). ` +
          `Install it (pip install diffu-lsp) or set "diffu.server.command". ${String(err)}`,
        "Open Settings",
        "Show Output",
      )
      .then((choice) => {
        if (choice === "Open Settings") {
          void vscode.commands.executeCommand("workbench.action.openSettings", "diffu.server");
        } else if (choice === "Show Output") {
          client?.outputChannel.show(true);
        }
      });
  }
}

// ------------------------------------------------------------------ commands

function runningClient(): LanguageClient | undefined {
  if (!client || client.state !== State.Running) {
    void vscode.window.showWarningMessage("Diffu: the language server is not running.");
    return undefined;
  }
  return client;
}

let tokenCounter = 0;

async function runServerCommand(
  title: string,
  command: string,
  args: Record<string, unknown>,
): Promise<void> {
  const c = runningClient();
  if (!c) {
    return;
  }
  await vscode.window.withProgress(
    { location: vscode.ProgressLocation.Notification, title, cancellable: true },
    async (progress, token) => {
      // Offer a client-side work-done token: the server reports the command's progress on it
      // (shown in this notification); cancelling sends $/cancelRequest for the request.
      const workDoneToken = `diffu-client-${process.pid}-${++tokenCounter}`;
      let lastPct = 0;
      const sub = c.onProgress(WorkDoneProgress.type, workDoneToken, (v) => {
        if (v.kind === "end") {
          return;
        }
        const increment = v.percentage !== undefined ? Math.max(0, v.percentage - lastPct) : undefined;
        if (v.percentage !== undefined) {
          lastPct = v.percentage;
        }
        progress.report({ message: v.message, increment });
      });
      const params: ExecuteCommandParams = { command, arguments: [args], workDoneToken };
      try {
        // a command that changes nothing: the server has said why (window/showMessage)
        await c.sendRequest(ExecuteCommandRequest.type, params, token);
      } catch (err) {
        if (token.isCancellationRequested) {
          return;
        }
        void vscode.window.showErrorMessage(`${title} failed: ${err instanceof Error ? err.message : String(err)}`);
      } finally {
        sub.dispose();
      }
    },
  );
}

function registerCommands(context: vscode.ExtensionContext): void {
  const reg = (id: string, fn: () => unknown): void => {
    context.subscriptions.push(vscode.commands.registerCommand(id, fn));
  };

  // A palette command that runs a server command on the active editor's document.
  const regEditor = (
    id: string,
    title: string,
    command: string,
    args: (editor: vscode.TextEditor, c: LanguageClient) => Record<string, unknown>,
  ): void =>
    reg(id, async () => {
      const editor = vscode.window.activeTextEditor;
      const c = runningClient();
      if (!editor || !c) {
        return;
      }
      await runServerCommand(title, command, {
        textDocument: { uri: c.code2ProtocolConverter.asUri(editor.document.uri) },
        ...args(editor, c),
      });
    });

  // An empty selection is sent as it is: the server decides what it means (refine: the line it is
  // on; fill holes: the enclosing function).
  regEditor("diffu.client.refineSelection", "Diffu: Refine Selection", SERVER_COMMANDS.refineSelection, (editor, c) => ({
    range: c.code2ProtocolConverter.asRange(editor.selection),
  }));
  regEditor("diffu.client.fillHoles", "Diffu: Fill Holes", SERVER_COMMANDS.fillHoles, (editor, c) => ({
    range: c.code2ProtocolConverter.asRange(editor.selection),
  }));
  regEditor("diffu.client.completeBlock", "Diffu: Complete Block", SERVER_COMMANDS.completeBlock, (editor, c) => ({
    position: c.code2ProtocolConverter.asPosition(editor.selection.active),
  }));

  // Next edit: jump to the nearest predicted edit after the cursor and select the text it
  // replaces; the quick fix (Ctrl+.) applies it. VS Code's public inline-suggestion API shows
  // text only at the cursor as an insertion, not a replacement elsewhere, so the replacement is
  // shown in the status bar and in the hint's hover.
  reg("diffu.client.nextEdit", async () => {
    const editor = vscode.window.activeTextEditor;
    const c = runningClient();
    if (!editor || !c) {
      return;
    }
    const args = {
      textDocument: { uri: c.code2ProtocolConverter.asUri(editor.document.uri) },
      position: c.code2ProtocolConverter.asPosition(editor.selection.active),
    };
    const found = (await c.sendRequest(ExecuteCommandRequest.type, {
      command: SERVER_COMMANDS.nextEdit,
      arguments: [args],
    })) as { range: Parameters<typeof c.protocol2CodeConverter.asRange>[0]; newText: string; message: string } | null;
    if (!found) {
      vscode.window.setStatusBarMessage("Diffu: no next edit predicted", 3000);
      return;
    }
    const range = c.protocol2CodeConverter.asRange(found.range);
    if (!range) {
      return;
    }
    editor.selection = new vscode.Selection(range.start, range.end);
    editor.revealRange(range, vscode.TextEditorRevealType.InCenterIfOutsideViewport);
    vscode.window.setStatusBarMessage(`Diffu: ${found.message} (Ctrl+. applies it)`, 5000);
  });

  reg("diffu.client.restartServer", async () => {
    if (client) {
      const old = client;
      client = undefined;
      try {
        await old.stop();
      } catch {
        // already stopped / never started
      }
      await old.dispose().catch(() => undefined);
    }
    await startClient(context);
  });

  // Suggestions as you type off/on: everywhere, or for the active editor's language (user settings).
  reg("diffu.client.toggleSuggestions", async () => {
    const cfg = vscode.workspace.getConfiguration(SECTION);
    const on = cfg.get<boolean>("inlineCompletion", true) === false;
    await cfg.update("inlineCompletion", on, vscode.ConfigurationTarget.Global);
    void vscode.window.showInformationMessage(`Diffu: suggestions ${on ? "on" : "off"}`);
    refreshStatus();
  });
  reg("diffu.client.toggleSuggestionsForLanguage", async () => {
    const languageId = vscode.window.activeTextEditor?.document.languageId;
    if (!languageId) {
      return;
    }
    const cfg = vscode.workspace.getConfiguration(SECTION);
    const disabled = cfg.get<string[]>("disabledLanguages", []) ?? [];
    const on = disabled.includes(languageId);
    const next = on ? disabled.filter((l) => l !== languageId) : [...disabled, languageId];
    await cfg.update("disabledLanguages", next, vscode.ConfigurationTarget.Global);
    void vscode.window.showInformationMessage(`Diffu: suggestions ${on ? "on" : "off"} for ${languageId}`);
    refreshStatus();
  });

  reg("diffu.client.showOutput", () => {
    client?.outputChannel.show(true);
  });
}

// ------------------------------------------------------------------ entry points

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  serverKeys = serverKeysFrom(context);
  statusBar = vscode.window.createStatusBarItem("diffu.status", vscode.StatusBarAlignment.Right, 100);
  statusBar.name = "Diffu LSP";
  statusBar.command = "diffu.client.showOutput";
  context.subscriptions.push(statusBar);
  registerCommands(context);

  context.subscriptions.push(
    vscode.window.onDidChangeActiveTextEditor(() => refreshStatus()),
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (e.affectsConfiguration(`${SECTION}.inlineCompletion`) || e.affectsConfiguration(`${SECTION}.disabledLanguages`)) {
        refreshStatus();
      }
      if (e.affectsConfiguration(`${SECTION}.server`)) {
        void vscode.window
          .showInformationMessage("Diffu: server settings changed.", "Restart Server")
          .then((choice) => {
            if (choice) {
              void vscode.commands.executeCommand("diffu.client.restartServer");
            }
          });
      }
    }),
  );

  await startClient(context);
}

export async function deactivate(): Promise<void> {
  if (client) {
    const c = client;
    client = undefined;
    await c.stop().catch(() => undefined);
  }
}
