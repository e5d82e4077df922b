"""BENCHMARKS.md: each suite owns the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`."""

from __future__ import annotations

import re
from pathlib import Path

from . import common

ORDER = ("replay", "editor", "speed", "quality", "edit", "next-edit", "memory", "daemon", "shapes", "soak", "gpu", "cluster")

HEADER = """# Benchmarks

Measured by `diffu-lsp bench <suite>` (`python -m diffu_lsp.bench <suite>` works too); each section
below is rewritten by `diffu-lsp bench <suite> --write` and names the command, the machine and the
date of its run. Figures within one section come from one run (medians, and ratios between numbers
measured in that run). Nothing here is edited by hand.

Suites: `replay` (typing replay against the real server over LSP), `speed` (decoding speed per
setting), `quality` (HumanEval infilling and held-out stdlib exact match and edit similarity per
setting), `memory` (peak memory, load time, time to first suggestion), `daemon` (the shared model
daemon against a model in every server), `all`; and, outside `all`, `shapes` (random-weight networks
of the real checkpoints' shapes: ms per step and block, the sampler's own overhead, memory), `soak`
(editor windows typing through daemon faults: every answer, its time, recovery per fault kind),
`cluster` (a Ray Serve cluster against the local daemon), `editor` (keystroke -> ghost text in a
real Neovim, split into its parts) and `gpu` (everything that needs a GPU, in
one offline run). Add `--quick` for a smoke-sized run.
"""

GPU_SECTION = """## On a GPU

Not measured yet: no GPU machine has been at hand. One command, run from a checkout on the GPU
machine, measures everything that needs one: nothing is downloaded and nothing installed (it needs
python3 with torch and transformers; diffu-lsp itself need not be installed, and msgspec is not
used); the networks are random weights in the real shapes, built on the GPU in bfloat16:

```sh
scripts/gpu-run.sh        # bench gpu, then trains the bundled model with the time left (9 minutes in all)
```

It rewrites this section and `bench-gpu.json` after each shape and context (to `$OUT` when set), so a run cut
short keeps what it measured, and exits with the benchmark's status. `diffu-lsp bench gpu --write`
is the benchmark alone. What it measures:

- **DiffuCoder/Dream-7B shape** (28 layers, 28 query / 4 K/V heads): ms per 64-token block at
  256, 1,024 and 4,096 tokens of context, for each K/V cache mode (none, prefix, dual, delayed) and
  1, 2, 4 and 8 tokens revealed per forward; per step, the network's ms per forward and the
  overhead outside it (sampler, backend, copies), as a share of a forward (the target is under 5 %);
- the KV-cached **autoregressive baseline** on the same network: ms per token and per block;
- **LLaDA-8B shape** (32 layers, 32/32 heads) at 8 tokens per forward;
- **`compile: true` against eager** on one delayed-cache block at 1,024 tokens, with the compile time;
- weights and **peak CUDA memory** per shape.

Checked on a CPU before any GPU run (tests/test_gpu_traps.py): the script runs to the end on the
tiny shape in an environment like the GPU image's (transformers 5.17, no msgspec, no network);
cached decoding works under transformers 5.0, 5.17 and 5.25; every unpadded forward calls SDPA
with no mask and grouped K/V heads (so flash attention may run); rotary positions stay in the
canvas through blocks and refreshes; one copy to the device per step; the LM head runs on the
scored rows only.

The numbers in the other sections come from the bundled tiny model on a CPU. To measure a real
model's decoding and quality, on a machine with a CUDA GPU (a 7.6B-parameter model takes about 15 GB
in bfloat16, plus activations):

```sh
pip install 'diffu-lsp[bench]'
hf download apple/DiffuCoder-7B-Base          # the weights: about 15 GB, once
diffu-lsp bench all --model apple/DiffuCoder-7B-Base --device cuda --write --out BENCHMARKS-DiffuCoder-7B.md
```

(`--model` also takes a local folder, e.g. a Dream-Coder or LLaDA checkpoint; `--dtype bfloat16` is the
default on a GPU.) The `memory` suite then also reports peak CUDA memory. Check the `held-out` caveat:
the stdlib exact-match lines are held out from the *bundled* model's training only — a large model has
almost certainly seen the standard library.

Nobody has run this here yet, so there are no GPU numbers; whoever does, please commit the file the
command writes (it names the GPU, torch version and date).
"""


def marker(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def section(result: dict) -> str:
    info = result.get("machine", {})
    lines = [f"## {result['title']}", ""]
    lines.append(f"Command: `{result.get('command', '')}`  ")
    lines.append(f"Machine: {common.machine_line(info)}  ")
    if info.get("model"):
        lines.append(f"Model: {info['model']}  ")
    lines.append(f"Date: {info.get('date', '')}; suite wall time {result.get('seconds', 0):.0f} s")
    lines.append("")
    lines.append(common.render(result))
    if result.get("plot_link"):
        lines.append(f"![quality vs tokens per forward]({result['plot_link']})\n")
    if result.get("notes"):
        lines.append("How it is measured:\n")
        lines.extend(f"- {note}" for note in result["notes"])
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def replace_section(document: str, name: str, body: str) -> str:
    start, end = marker(name)
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(document):
        return pattern.sub(lambda _: block, document, count=1)
    # insert before the first section that comes later in ORDER, else append
    later = ORDER[ORDER.index(name) + 1:] if name in ORDER else ()
    for other in later:
        position = document.find(marker(other)[0])
        if position >= 0:
            return document[:position] + block + "\n\n" + document[position:]
    return document.rstrip() + "\n\n" + block + "\n"


def write(path: Path, results: list[dict]) -> Path:
    path = Path(path)
    document = path.read_text(encoding="utf-8") if path.exists() else HEADER
    first = document.find("<!-- bench:")
    if document.startswith("# Benchmarks") and first >= 0:  # the header follows the code's list of suites
        document = HEADER.rstrip() + "\n\n" + document[first:]
    for result in results:
        document = replace_section(document, result["suite"], section(result))
    bundled = all(str(r.get("machine", {}).get("model", "")).startswith("bundled") for r in results)
    if bundled and marker("gpu")[0] not in document:  # a file of real-model numbers needs no pointer
        document = replace_section(document, "gpu", GPU_SECTION)
    path.write_text(document, encoding="utf-8")
    return path
