#!/usr/bin/env bash
# Type-check and package the VS Code extension from a clean checkout (needs node >= 20 and the
# npm registry only). Produces editors/vscode/diffu-lsp-<version>.vsix.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
npm run check
npm run package
ls -l ./*.vsix
