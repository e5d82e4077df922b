#!/usr/bin/env bash
# Type-check and package the VS Code extension from a clean checkout (needs node >= 20 and the
# npm registry only). Produces editors/vscode/diffu-lsp-<version>.vsix.
# When the diffu_lsp package is importable (CI's virtualenv), also checks that package.json's
# settings match the server's (keys, defaults, enums, and descriptions: the `#:` comments above
# the fields in diffu_lsp/settings.py; scripts/check_settings.py --write copies them over).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if "$PYTHON" -c "import diffu_lsp.settings" >/dev/null 2>&1; then
  "$PYTHON" scripts/check_settings.py
else
  echo "build.sh: diffu_lsp is not importable with $PYTHON; skipping the settings check"
fi
npm ci --no-audit --no-fund
npm run check
npm run package
ls -l ./*.vsix
