"""Check that package.json's `diffu.*` settings match the server's Settings: keys, defaults, enums,
and descriptions. A setting's description is written once, as the `#:` comment lines above its
field in diffu_lsp/settings.py; `--write` copies them into package.json's markdownDescription.

    python editors/vscode/scripts/check_settings.py [--write]     (needs diffu_lsp importable)
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import typing
from pathlib import Path

import msgspec

from diffu_lsp import settings as settings_module
from diffu_lsp.settings import Settings

CLIENT_ONLY = ("server.", "trace.")


PACKAGE_JSON = Path(__file__).resolve().parent.parent / "package.json"


def field_descriptions() -> dict[str, str]:
    """Field name -> the `#:` comment lines right above it in class Settings, joined."""
    source = inspect.getsource(settings_module.Settings)
    out, lines = {}, []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            lines.append(stripped[2:].strip())
        elif match := re.match(r"(\w+)\s*:", stripped):
            if lines:
                out[match.group(1)] = " ".join(lines)
            lines = []
        elif stripped:
            lines = []
    return out


def readme_defaults() -> dict[str, object]:
    """`"diffu.KEY": VALUE` lines of the settings example in editors/vscode/README.md."""
    readme = (PACKAGE_JSON.parent / "README.md").read_text()
    out = {}
    for match in re.finditer(r'^\s*"diffu\.([\w.]+)":\s*(.+?),?\s*(?://.*)?$', readme, re.M):
        out[match.group(1)] = json.loads(match.group(2))
    return out


def main(argv: list[str] | None = None) -> int:
    write = "--write" in (sys.argv[1:] if argv is None else argv)
    pkg = json.loads(PACKAGE_JSON.read_text())
    props = pkg["contributes"]["configuration"]["properties"]
    ours = {k[len("diffu."):]: v for k, v in props.items()
            if k.startswith("diffu.") and not k[len("diffu."):].startswith(CLIENT_ONLY)}
    hints = typing.get_type_hints(Settings, include_extras=True)
    fields = {f.encode_name: f for f in msgspec.structs.fields(Settings)}
    problems = []
    described = field_descriptions()
    for key in sorted(set(fields) & set(ours)):
        text = described.get(fields[key].name)
        if text is None:
            problems.append(f"diffu.{key}: no `#:` description above {fields[key].name} in settings.py")
        elif ours[key].get("markdownDescription") != text:
            if write:
                ours[key]["markdownDescription"] = text
            else:
                problems.append(f"diffu.{key}: description differs from settings.py (run with --write)")
    if write:
        PACKAGE_JSON.write_text(json.dumps(pkg, indent=2, ensure_ascii=False) + "\n")
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
    for key, value in readme_defaults().items():
        prop = props.get(f"diffu.{key}")
        if prop is None:
            problems.append(f"README.md: diffu.{key} is not a setting")
        elif prop.get("default") != value:
            problems.append(f"README.md: diffu.{key} shown as {value!r}, the default is {prop.get('default')!r}")
    for p in problems:
        print(p)
    print(f"{len(fields)} server settings checked: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
