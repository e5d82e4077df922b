#!/usr/bin/env bash
# Installs what tests/test_vscode_workbench.py (test/workbench.js) needs to run the extension in a
# real VS Code workbench, from the npm registry and Debian's packages only (no Microsoft download):
#   - code-server 4.100.3 (Coder's VS Code 1.100.3 for the browser: the newest release whose engines
#     field says node 20) and playwright-core 1.52.0, in $DIFFU_WORKBENCH
#     (default ~/.cache/diffu-lsp/vscode-workbench);
#   - Debian's chromium (apt-get install, system-wide; skipped when /usr/bin/chromium exists);
#   - the extension's own node_modules (npm ci in editors/vscode: vsce packages the extension).
# Needs node 20, npm, gcc/g++/make/python3 (node-gyp) and apt (Debian bookworm).
# code-server's own postinstall would download ripgrep from GitHub, so this script runs its steps
# itself, with --ignore-scripts, and takes rg from Debian's ripgrep package; kerberos (compiled)
# needs only the krb5 headers, from Debian's libkrb5-dev, unpacked here and not installed.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
CODE_SERVER_VERSION=4.100.3
PLAYWRIGHT_VERSION=1.52.0
PREFIX="${DIFFU_WORKBENCH:-$HOME/.cache/diffu-lsp/vscode-workbench}"
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" = 20 ] || { echo "install-workbench.sh: code-server $CODE_SERVER_VERSION needs node 20, not $(node --version)" >&2; exit 1; }

if [ ! -x /usr/bin/chromium ]; then
  apt-get install -y --no-install-recommends chromium
fi

mkdir -p "$PREFIX/debs"
cd "$PREFIX/debs"
# Headers for kerberos's build (it dlopens the runtime library, which Debian always has) and rg.
apt-get download libkrb5-dev krb5-multidev comerr-dev ripgrep
for deb in ./*.deb; do dpkg-deb -x "$deb" root; done

cd "$PREFIX"
export npm_config_yes=true   # node-pty's install script runs `npx node-gyp`
npm install --no-audit --no-fund --ignore-scripts --prefix "$PREFIX" \
  "code-server@$CODE_SERVER_VERSION" "playwright-core@$PLAYWRIGHT_VERSION"
CS="$PREFIX/node_modules/code-server"
npm rebuild argon2   # code-server's password hashing (node-pre-gyp: no prebuilt reachable, so it compiles)
# What code-server's postinstall.sh does, minus the ripgrep download:
cd "$CS/lib/vscode"
npm install --no-audit --no-fund --omit=dev --ignore-scripts
CPATH="$PREFIX/debs/root/usr/include" npm rebuild \
  @parcel/watcher @vscode/deviceid @vscode/spdlog kerberos native-watchdog node-pty
mkdir -p node_modules/@vscode/ripgrep/bin
cp "$PREFIX/debs/root/usr/bin/rg" node_modules/@vscode/ripgrep/bin/rg
ln -sfn node_modules node_modules.asar
ln -sfn code-linux.sh bin/remote-cli/code-server
ln -sfn browser-linux.sh bin/helpers/browser.sh
cd extensions
npm install --no-audit --no-fund --omit=dev --ignore-scripts
node ./postinstall.mjs >/dev/null

XDG_CONFIG_HOME="$PREFIX/xdg" XDG_DATA_HOME="$PREFIX/xdg" node "$CS/out/node/entry.js" --version
du -sh "$PREFIX"

cd "$HERE/.."
npm ci --no-audit --no-fund
