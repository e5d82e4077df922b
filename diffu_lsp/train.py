"""Train the bundled tiny Dream-format code model on the interpreter's own standard library.

    python -m diffu_lsp.train --work .train --out diffu_lsp/assets/tiny-dream

Deterministic given --seed (same Python, same torch); resumable: it checkpoints to --work every
--save-every steps and on SIGINT/SIGTERM, and picks up from there when started again.

The model is a Qwen2 backbone run with full bidirectional attention and Dream's shifted logits
(hidden state i-1 scores the token at position i), saved in Dream's checkpoint layout. Objective:
- masked diffusion: mask ratio t ~ U(eps, 1), cross-entropy on masked positions weighted 1/t;
- span infill with pad-to-length: a span becomes a hole of `length >= span` positions whose
  targets are the span followed by pad, noised the same way, so a fixed-size hole can yield a
  shorter completion by ending in pad;
- token editing (ReMDM / LLaDA 2.1's token-to-token / ELECTRA's replaced tokens): in each sample a
  share of the *visible* tokens (`--edit-rate` on average) is replaced by a wrong one: a uniformly
  random token, another token of the same window, or a near miss (a token one character away: an
  off-by-one digit, `<` for `>`, `-=` for `+=`); the model is trained to give the true token at
  every replaced position (weight `--edit-weight`) and at the clean visible ones (`--keep-weight`),
  so it can judge the tokens it sees: keep what is right, replace what is wrong.

Data: the standard library (a fixed held-out tenth of its files, by path hash, for the benchmarks)
and, with `--packages`, the pure-Python sources of the installed packages whose licence is a
permissive one (MIT, BSD, Apache, PSF, ISC), split the same way by path.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import signal
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2Config, Qwen2ForCausalLM

EOS = "<|endoftext|>"
MASK = "<|mask|>"
SPECIAL_TOKENS = [EOS, MASK]  # ids 0 and 1
# Qwen2's pre-tokenizer split: keeps newlines and runs of indentation as their own pieces.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "encodings", "__pycache__", "pydoc_data"}
# Sampling defaults shipped with the model (generation_config.json). The tiny model rates pad as
# the likeliest token of an untouched hole; without a penalty most holes come out empty
# (held-out single-line suggestions: 27 % non-empty at 0, 100 % at 3; see BENCHMARKS.md). The
# decoding rule is the one `diffu-lsp bench quality` chose for this model (BENCHMARKS.md, Quality).
GENERATION_DEFAULTS = {"eos_penalty": 3.0, "alg": "factor", "factor": 8.0}
# A model trained with token editing also ships the edit threshold the `bench edit` suite chose.
EDIT_THRESHOLD = 0.9
MODEL_SHAPE = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0,
)


# ---------------------------------------------------------------- data

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relpath: str) -> bool:
    """Fixed evaluation split: about one stdlib file in ten, chosen by a hash of its path."""
    return int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 10 == 0


def stdlib_files(held_out: bool, root: Path | None = None) -> list[Path]:
    """Python sources of the standard library (tests and generated tables left out), sorted."""
    root = root or stdlib_root()
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in SKIPPED_DIRS or p.startswith("test_") for p in parts):
            continue
        if path.stat().st_size > 200_000:
            continue
        if is_held_out(path.relative_to(root).as_posix()) == held_out:
            found.append(path)
    return found


PERMISSIVE = ("MIT", "BSD", "APACHE", "PSF", "PYTHON SOFTWARE FOUNDATION", "ISC", "0BSD")
PACKAGE_CAP_BYTES = 3_000_000  # per package, so that a few big ones (torch, sympy) do not dominate


def license_of(dist: importlib.metadata.Distribution) -> str:
    meta = dist.metadata
    text = meta.get("License-Expression") or ""
    classifiers = [c for c in (meta.get_all("Classifier") or []) if c.startswith("License ::")]
    if not text:
        short = (meta.get("License") or "").strip()
        text = short if len(short) < 80 else ""  # some put the whole licence text there
    return " ".join([text, *classifiers])


def is_permissive(license_text: str) -> bool:
    upper = license_text.upper()
    return any(word in upper for word in PERMISSIVE) and not any(w in upper for w in ("GPL", "MPL", "EUPL"))


def package_files(held_out: bool) -> list[tuple[str, Path]]:
    """(name, path) of the .py files of installed permissively licensed packages (tests left out,
    at most PACKAGE_CAP_BYTES each), held-out split by a hash of 'site-packages/<path>'."""
    found = []
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        name = dist.metadata["Name"] or ""
        if not name or name.lower().replace("_", "-") == "diffu-lsp" or not is_permissive(license_of(dist)):
            continue
        size = 0
        for file in sorted(dist.files or [], key=str):
            rel = Path(str(file))
            if rel.suffix != ".py" or any(p in SKIPPED_DIRS or p.startswith("test_") or p.endswith(".dist-info")
                                          or p == ".." for p in rel.parts):
                continue
            path = Path(dist.locate_file(file))
            if not path.is_file() or path.stat().st_size > 200_000:
                continue
            if is_held_out("site-packages/" + rel.as_posix()) != held_out:
                continue
            size += path.stat().st_size
            if size > PACKAGE_CAP_BYTES:
                break
            found.append((name, path))
    return found


def read_source(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator((read_source(p) for p in files), trainer=trainer)
    return tokenizer


def encode_corpus(tokenizer: Tokenizer, files: list[Path]) -> np.ndarray:
    eos = tokenizer.token_to_id(EOS)
    pieces = []
    for encoding in tokenizer.encode_batch([read_source(p) for p in files]):
        pieces.append(np.asarray(encoding.ids, dtype=np.int32))
        pieces.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(pieces)


def newline_token_table(tokenizer: Tokenizer) -> np.ndarray:
    """table[id] is True when the token's text contains a line break."""
    table = np.zeros(tokenizer.get_vocab_size(), dtype=bool)
    for token_id in range(len(table)):
        table[token_id] = "\n" in tokenizer.decode([token_id])
    return table


def near_miss_table(tokenizer: Tokenizer) -> list[np.ndarray]:
    """table[id]: the tokens whose text is one character substitution away (same length): an
    off-by-one digit, a swapped operator, a one-letter typo of a name."""
    vocab = tokenizer.get_vocab_size()
    texts = [tokenizer.decode([i]) for i in range(vocab)]
    groups: dict[str, list[int]] = {}
    for token_id, text in enumerate(texts):
        if token_id < len(SPECIAL_TOKENS) or not text or "\ufffd" in text:
            continue
        for i in range(len(text)):
            groups.setdefault(f"{len(text)}:{text[:i]}\0{text[i + 1:]}", []).append(token_id)
    table: list[set[int]] = [set() for _ in range(vocab)]
    for members in groups.values():
        for token_id in members:
            table[token_id].update(m for m in members if m != token_id)
    return [np.asarray(sorted(t), dtype=np.int64) for t in table]


class BatchMaker:
    """Draws training examples from the token stream; every draw uses the generator it is given."""

    def __init__(self, corpus: np.ndarray, newline: np.ndarray, seq_len: int, mask_id: int, pad_id: int,
                 near_miss: list[np.ndarray] | None = None, edit_rate: float = 0.0,
                 edit_weight: float = 1.0, keep_weight: float = 0.0):
        self.corpus, self.newline, self.seq_len = corpus, newline, seq_len
        self.mask_id, self.pad_id = mask_id, pad_id
        self.near_miss, self.edit_rate = near_miss, edit_rate
        self.edit_weight, self.keep_weight = edit_weight, keep_weight
        self.vocab = len(newline)

    def __call__(self, rng: np.random.Generator, batch_size: int):
        inputs = np.empty((batch_size, self.seq_len), dtype=np.int64)
        targets = np.empty_like(inputs)
        weights = np.zeros((batch_size, self.seq_len), dtype=np.float32)
        for row in range(batch_size):
            start = rng.integers(0, len(self.corpus) - self.seq_len - 1)
            window = self.corpus[start:start + self.seq_len]
            if rng.random() < 0.5:
                x0, hole = window, np.ones(self.seq_len, dtype=bool)
                hole[0] = False  # position 0 has no left neighbour to be scored from
            else:
                x0, hole = self._span_infill(rng, window)
            t = rng.uniform(1e-3, 1.0)
            masked = hole & (rng.random(self.seq_len) < t)
            if not masked.any():
                masked[rng.choice(np.flatnonzero(hole))] = True
            inputs[row] = np.where(masked, self.mask_id, x0)
            targets[row] = x0
            weights[row] = masked / t
            if self.edit_rate > 0:
                visible = ~masked
                visible[0] = False  # position 0 is scored from itself, not from a neighbour
                corrupted = self._corrupt(rng, inputs[row], x0, visible)
                weights[row] += np.where(corrupted, self.edit_weight, np.where(visible, self.keep_weight, 0.0))
        return torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(weights)

    def _corrupt(self, rng, tokens: np.ndarray, x0: np.ndarray, visible: np.ndarray) -> np.ndarray:
        """Replace a share (U(0, 2 * edit_rate)) of the visible tokens in place by wrong ones, a third
        each: uniform random, another token of this window, a near miss (else a window token)."""
        chosen = np.flatnonzero(visible & (rng.random(len(tokens)) < rng.uniform(0, 2 * self.edit_rate)))
        corrupted = np.zeros(len(tokens), dtype=bool)
        first = len(SPECIAL_TOKENS)
        for at in chosen:
            true = int(x0[at])
            kind = rng.integers(0, 3)
            near = self.near_miss[true] if self.near_miss is not None and kind == 2 else ()
            if len(near):
                wrong = int(near[rng.integers(0, len(near))])
            elif kind == 0:
                wrong = int(rng.integers(first, self.vocab))
            else:
                wrong = int(x0[rng.integers(0, len(x0))])
            if wrong != true and wrong >= first:
                tokens[at] = wrong
                corrupted[at] = True
        return corrupted

    def _span_infill(self, rng, window):
        """prefix + [span, pad...] + suffix, truncated to seq_len; hole marks the span+pad slots."""
        n = self.seq_len
        line_starts = np.flatnonzero(self.newline[window[:-1]]) + 1
        if rng.random() < 0.5 and len(line_starts) >= 3:
            first = rng.integers(0, len(line_starts) - 1)
            last = min(first + rng.integers(1, 5), len(line_starts) - 1)
            a, b = line_starts[first], line_starts[last]
        else:
            a = rng.integers(8, n - 64)
            b = a + rng.integers(1, 49)
        a, b = int(a), int(min(b, a + 96, n - 16))
        if b <= a or a < 1:
            a, b = 8, 9
        span = window[a:b]
        extra = 0 if rng.random() < 0.25 else int(rng.integers(1, 49))
        hole_len = len(span) + extra
        x0 = np.concatenate([window[:a], span, np.full(extra, self.pad_id, dtype=window.dtype), window[b:]])[:n]
        hole = np.zeros(n, dtype=bool)
        hole[a:min(a + hole_len, n)] = True
        return x0, hole


# ---------------------------------------------------------------- model

def build_model(tokenizer: Tokenizer) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        **MODEL_SHAPE, tie_word_embeddings=True, hidden_act="silu", rms_norm_eps=1e-6,
        attention_dropout=0.0, use_cache=False,
        bos_token_id=tokenizer.token_to_id(EOS), eos_token_id=tokenizer.token_to_id(EOS),
        pad_token_id=tokenizer.token_to_id(EOS),
    )
    return Qwen2ForCausalLM(config)


def shifted_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Bidirectional forward, then Dream's shift: row i scores the token at position i."""
    batch, length = input_ids.shape
    full_attention = torch.zeros(batch, 1, length, length, dtype=model.dtype, device=input_ids.device)
    logits = model(input_ids=input_ids, attention_mask=full_attention).logits
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def learning_rate(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---------------------------------------------------------------- export

def export_dream_checkpoint(model: Qwen2ForCausalLM, tokenizer: Tokenizer, out: Path, card: dict) -> None:
    """Write the folder in Dream's layout: config.json (model_type "Dream"), Qwen2 weight keys."""
    out.mkdir(parents=True, exist_ok=True)
    qwen = model.config
    eos_id, mask_id = tokenizer.token_to_id(EOS), tokenizer.token_to_id(MASK)
    config = {
        "architectures": ["DreamModel"], "model_type": "Dream",
        **MODEL_SHAPE, "hidden_act": "silu", "rms_norm_eps": qwen.rms_norm_eps,
        "tie_word_embeddings": True, "attention_dropout": 0.0, "initializer_range": 0.02,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id, "mask_token_id": mask_id,
        "torch_dtype": "bfloat16", "use_cache": False, "use_sliding_window": False,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS,
        "mask_token": MASK, "model_max_length": qwen.max_position_embeddings,
    }, indent=2) + "\n")
    generation = dict(GENERATION_DEFAULTS, **({"edit_threshold": EDIT_THRESHOLD} if "token editing" in
                                               card.get("objective", "") else {}))
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(card, indent=2) + "\n")


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(".train"), help="checkpoints and token cache")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "assets" / "tiny-dream")
    parser.add_argument("--steps", type=int, default=2600)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--export-every", type=int, default=250, help="also refresh --out every N steps")
    parser.add_argument("--init-from", type=Path, help="start from an exported model folder's weights and "
                        "tokenizer (e.g. the bundled model) when --work holds no checkpoint yet")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--max-minutes", type=float, help="stop (checkpointed and exported) after this long")
    parser.add_argument("--packages", action="store_true", help="also train on the installed permissively "
                        "licensed packages' Python sources (held-out split by path, like the stdlib's)")
    parser.add_argument("--edit-rate", type=float, default=0.0, help="token editing: mean share of the visible "
                        "tokens replaced by wrong ones (0: masked-only training, as before)")
    parser.add_argument("--edit-weight", type=float, default=1.0, help="loss weight at a replaced token")
    parser.add_argument("--keep-weight", type=float, default=0.1, help="loss weight at a clean visible token "
                        "(with --edit-rate)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)

    tokenizer_path = args.work / "tokenizer.json"
    train_files = stdlib_files(held_out=False)
    packages = package_files(held_out=False) if args.packages else []
    train_files += [path for _, path in packages]
    if args.init_from and not tokenizer_path.exists():
        tokenizer_path.write_bytes((args.init_from / "tokenizer.json").read_bytes())
    if tokenizer_path.exists():
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    else:
        tokenizer = train_tokenizer(train_files, MODEL_SHAPE["vocab_size"])
        tokenizer.save(str(tokenizer_path))
    corpus_path = args.work / ("corpus+packages.npy" if args.packages else "corpus.npy")
    if corpus_path.exists():
        corpus = np.load(corpus_path)
    else:
        corpus = encode_corpus(tokenizer, train_files)
        np.save(corpus_path, corpus)
    print(f"{len(train_files)} training files, {len(corpus):,} tokens", flush=True)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = build_model(tokenizer).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    make_batch = BatchMaker(corpus, newline_token_table(tokenizer), args.seq_len,
                            tokenizer.token_to_id(MASK), tokenizer.token_to_id(EOS),
                            near_miss_table(tokenizer) if args.edit_rate else None, args.edit_rate,
                            args.edit_weight, args.keep_weight)
    rng = np.random.default_rng(args.seed)
    step, history = 0, []
    checkpoint_path = args.work / "checkpoint.pt"
    if checkpoint_path.exists():
        saved = torch.load(checkpoint_path, weights_only=False, map_location="cpu")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        rng.bit_generator.state = saved["rng"]
        step, history = saved["step"], saved["history"]
        print(f"resumed at step {step}", flush=True)
    elif args.init_from:
        from safetensors.torch import load_file
        weights = load_file(str(args.init_from / "model.safetensors"))
        model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
        print(f"initialised from {args.init_from}", flush=True)

    def save_checkpoint():
        tmp = checkpoint_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "rng": rng.bit_generator.state, "step": step, "history": history}, tmp)
        tmp.replace(checkpoint_path)

    def card():
        names = sorted({name for name, _ in packages})
        data = "CPython standard library (tests, encodings, pydoc_data left out)"
        if names:
            data += f" and the Python sources of {len(names)} permissively licensed packages ({', '.join(names)})"
        return {"data": f"{data}, {len(train_files)} files, {len(corpus):,} tokens",
                "objective": "masked diffusion + span infill" + (
                    f" + token editing (edit rate {args.edit_rate}, weights {args.edit_weight}/{args.keep_weight})"
                    if args.edit_rate else ""),
                "shape": MODEL_SHAPE, "parameters": sum(p.numel() for p in model.parameters()),
                "steps": step, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed,
                "tokens_seen": step * args.batch * args.seq_len, "python": sys.version.split()[0],
                "final_loss": float(np.mean([h[1] for h in history[-50:]])) if history else None,
                "command": "python -m diffu_lsp.train " + " ".join(argv if argv is not None else sys.argv[1:])}

    stop = {"now": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.update(now=True))

    model.train()
    started = deadline = time.time()
    deadline += 60 * args.max_minutes if args.max_minutes else math.inf
    while step < args.steps and not stop["now"] and time.time() < deadline:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        inputs, targets, weights = (t.to(device) for t in make_batch(rng, args.batch))
        logits = shifted_logits(model, inputs)
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        loss = (token_loss * weights.reshape(-1)).sum() / weights.numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        masked = inputs == make_batch.mask_id
        token_loss = token_loss.detach().reshape(weights.shape)
        plain_ce = float(token_loss[masked].mean())
        history.append((step, loss.item(), plain_ce))
        if step % 10 == 0:
            rate = (time.time() - started) / 10
            started = time.time()
            line = f"step {step} loss {float(loss):.3f} masked-ce {plain_ce:.3f}"
            if args.edit_rate:
                right = logits.detach().argmax(-1) == targets
                edited, kept = (inputs != targets) & ~masked, (weights > 0) & ~masked & (inputs == targets)
                line += (f" edit-ce {float(token_loss[edited].mean()):.3f} fixed {float(right[edited].float().mean()):.2f}"
                         f" keep-ce {float(token_loss[kept].mean()):.3f} kept {float(right[kept].float().mean()):.3f}")
            print(f"{line} lr {learning_rate(step, args.steps, args.lr):.2e} {rate:.2f}s/step", flush=True)
        if step % args.save_every == 0:
            save_checkpoint()
        if step % args.export_every == 0:
            export_dream_checkpoint(model, tokenizer, args.out, card())
    save_checkpoint()
    export_dream_checkpoint(model, tokenizer, args.out, card())
    print(f"saved at step {step} to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
