"""Check that package.json's `diffu.*` settings match the server's Settings (keys, defaults, enums).

    python editors/vscode/scripts/check_settings.py      (needs diffu_lsp importable)
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path

import msgspec

from diffu_lsp.settings import Settings

CLIENT_ONLY = ("server.", "trace.")


def main() -> int:
    pkg = json.loads((Path(__file__).resolve().parent.parent / "package.json").read_text())
    props = pkg["contributes"]["configuration"]["properties"]
    ours = {k[len("diffu."):]: v for k, v in props.items()
            if k.startswith("diffu.") and not k[len("diffu."):].startswith(CLIENT_ONLY)}
    hints = typing.get_type_hints(Settings, include_extras=True)
    fields = {f.encode_name: f for f in msgspec.structs.fields(Settings)}
    problems = []
    for key in sorted(set(fields) - set(ours)):
        problems.append(f"diffu.{key}: a server setting missing from package.json")
    for key in sorted(set(ours) - set(fields)):
        problems.append(f"diffu.{key}: in package.json but not a server setting")
    for key in sorted(set(fields) & set(ours)):
        field, prop = fields[key], ours[key]
        default = field.default
        if isinstance(default, tuple):
            default = list(default)
        if prop.get("default") != default:
            problems.append(f"diffu.{key}: default {prop.get('default')!r} in package.json, {default!r} in the server")
        hint = hints[field.name]
        while typing.get_origin(hint) is typing.Annotated:
            hint = typing.get_args(hint)[0]
        if typing.get_origin(hint) is typing.Literal:
            if sorted(prop.get("enum", [])) != sorted(typing.get_args(hint)):
                problems.append(f"diffu.{key}: enum {prop.get('enum')} in package.json, {list(typing.get_args(hint))} in the server")
    for p in problems:
        print(p)
    print(f"{len(fields)} server settings checked: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
