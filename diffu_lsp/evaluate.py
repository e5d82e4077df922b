"""Evaluate a model on the held-out standard-library files (never seen in training).

    python -m diffu_lsp.evaluate [--model M] [--write BENCHMARKS.md]

- masked-token accuracy at 15/50/90 % masking (one forward, argmax), against the unigram
  baseline (always guess the training corpus's most frequent token);
- single-line infill exact match: a held-out line's code is removed (its indentation, the
  prefix and the suffix kept) and the suggestion at that point is compared to it, through the
  same `features.answer` job path the server uses; baseline: repeat the previous non-blank line.
"""

from __future__ import annotations

import argparse
import collections
import platform
import random
import statistics
import sys
from datetime import date
from pathlib import Path

import msgspec
import torch

from .job import Request
from .features import answer
from .models import load_model
from .settings import Settings
from .train import read_source, stdlib_files

MASK_RATES = (0.15, 0.50, 0.90)


def masked_windows(model, files, rate: float, windows: int, seq_len: int, seed: int):
    """(window ids, masked positions) drawn from the files; the same draws for the same seed."""
    rng = random.Random(seed)
    streams = [s for s in (model.encode(read_source(f)) for f in files) if len(s) > seq_len + 1]
    for _ in range(windows):
        stream = rng.choice(streams)
        start = rng.randrange(len(stream) - seq_len)
        window = stream[start:start + seq_len]
        yield window, [i for i in range(1, seq_len) if rng.random() < rate] or [1]


def masked_accuracy(model, files, rate: float, windows: int, seq_len: int, seed: int) -> float:
    correct = total = 0
    for window, masked in masked_windows(model, files, rate, windows, seq_len, seed):
        canvas = list(window)
        for i in masked:
            canvas[i] = model.mask_token_id
        predicted = model.logits(torch.tensor([canvas]))[0].argmax(-1)
        correct += sum(int(predicted[i]) == window[i] for i in masked)
        total += len(masked)
    return correct / total


def unigram_accuracy(model, train_files, eval_files, rate: float, windows: int, seq_len: int, seed: int) -> float:
    """Accuracy of always guessing the training corpus's most frequent token (same masked slots)."""
    counts = collections.Counter()
    for f in train_files:
        counts.update(model.encode(read_source(f)))
    most_frequent = counts.most_common(1)[0][0]
    correct = total = 0
    for window, masked in masked_windows(model, eval_files, rate, windows, seq_len, seed):
        correct += sum(window[i] == most_frequent for i in masked)
        total += len(masked)
    return correct / total


def line_tasks(files, count: int, seed: int):
    """(text with the line's code removed, cursor, expected code, previous non-blank line)."""
    rng = random.Random(seed)
    tasks = []
    while len(tasks) < count:
        text = read_source(rng.choice(files))
        lines = text.split("\n")
        if len(lines) < 3:
            continue
        index = rng.randrange(1, len(lines) - 1)
        code = lines[index].strip()
        if len(code) < 8 or code.startswith("#"):
            continue
        indent = lines[index][:len(lines[index]) - len(lines[index].lstrip())]
        before = "\n".join(lines[:index]) + "\n" + indent
        after = "\n" + "\n".join(lines[index + 1:])
        previous = next((l.strip() for l in reversed(lines[:index]) if l.strip()), "")
        tasks.append((before + after, len(before), code, previous))
    return tasks


def line_exact_match(model, tasks, settings: Settings) -> tuple[float, float, float, float]:
    """(exact match, non-empty rate, median seconds, mean forwards) of the first suggested line."""
    hits, shown, seconds, forwards = 0, 0, [], []
    for text, cursor, expected, _ in tasks:
        result = answer(model, Request("suggest", text, cursor, cursor, settings))
        first_line = result.text.split("\n")[0].strip()
        hits += first_line == expected
        shown += bool(first_line)
        seconds.append(result.seconds)
        forwards.append(result.forwards)
    return hits / len(tasks), shown / len(tasks), statistics.median(seconds), statistics.mean(forwards)


def write_section(path: Path, name: str, body: str) -> None:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--windows", type=int, default=120)
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--write", type=Path, help="update this markdown file's tiny-model section")
    args = parser.parse_args(argv)
    command = "python -m diffu_lsp.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
    model = load_model(args.model, device=args.device)
    eval_files, train_files = stdlib_files(held_out=True), stdlib_files(held_out=False)

    rows = []
    for rate in MASK_RATES:
        acc = masked_accuracy(model, eval_files, rate, args.windows, args.seq_len, args.seed)
        base = unigram_accuracy(model, train_files, eval_files, rate, args.windows, args.seq_len, args.seed)
        rows.append((rate, acc, base))
        print(f"masked {rate:.0%}: model {acc:.3f}  unigram {base:.3f}", flush=True)

    tasks = line_tasks(eval_files, args.lines, args.seed)
    baseline = sum(expected == previous for _, _, expected, previous in tasks) / len(tasks)
    settings = {
        "server defaults (threshold τ=0.9, dual cache, early exit, the model's EOS penalty)": Settings(),
        "one token per step (entropy, steps = hole)": msgspec.structs.replace(Settings(), algorithm="entropy"),
        "threshold τ=0.9, no EOS penalty": msgspec.structs.replace(Settings(), eos_penalty=0.0),
    }
    line_rows = []
    for label, s in settings.items():
        em, shown, median_s, mean_forwards = line_exact_match(model, tasks, s)
        line_rows.append((label, em, shown, median_s, mean_forwards))
        print(f"single-line EM [{label}]: {em:.3f}  non-empty {shown:.2f}  median {median_s * 1000:.0f} ms  "
              f"{mean_forwards:.1f} forwards", flush=True)
    print(f"single-line EM [baseline: repeat previous line]: {baseline:.3f}")

    card = (model.name and Path(model.name) / "training.json")
    trained = msgspec.json.decode(card.read_bytes()) if card and card.exists() else {}
    body = [
        "## The bundled tiny model",
        "",
        f"Command: `{command}` · {date.today()} · {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {model.device}",
        "",
        f"Model: `{Path(model.name).name}`, {model.parameter_count / 1e6:.1f} M parameters, Dream format "
        f"(Qwen2 backbone, bidirectional, shifted logits). Trained with "
        f"`{trained.get('command', 'python -m diffu_lsp.train')}`: {trained.get('steps', '?')} steps, "
        f"{trained.get('tokens_seen', 0) / 1e6:.1f} M tokens seen, final masked loss {trained.get('final_loss') or float('nan'):.3f}.",
        f"Held-out data: {len(eval_files)} standard-library files never trained on "
        f"(`diffu_lsp.train.is_held_out`).",
        "",
        f"Masked-token accuracy ({args.windows} windows of {args.seq_len} tokens, one forward, argmax):",
        "",
        "| masked | model | unigram baseline |",
        "|---|---|---|",
        *[f"| {rate:.0%} | {acc:.3f} | {base:.3f} |" for rate, acc, base in rows],
        "",
        f"Single-line infill exact match ({args.lines} held-out lines; code of the line removed, its "
        "indentation, the prefix and suffix kept; first suggested line compared after strip):",
        "",
        "| setting | exact match | non-empty | median latency | mean forwards |",
        "|---|---|---|---|---|",
        *[f"| {label} | {em:.3f} | {shown:.2f} | {s * 1000:.0f} ms | {f:.1f} |" for label, em, shown, s, f in line_rows],
        f"| baseline: repeat the previous non-blank line | {baseline:.3f} | – | – | – |",
    ]
    text = "\n".join(body)
    if args.write:
        write_section(args.write, "tiny-model", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
