"""Tokenizers for diffusion checkpoints, built from their files without running their code.

Two layouts:
- `tokenizer.json` (the bundled model, LLaDA, most hub folders): loaded as a fast tokenizer.
- `vocab.json` + `merges.txt` + `added_tokens.json` with no tokenizer.json (DiffuCoder, Dream):
  their `tokenizer_config.json` names `DreamTokenizer` through `auto_map`, which is Qwen2's
  byte-level BPE; we build that from the files and put every added token back at its id.
"""

from __future__ import annotations

import json
from typing import Callable

from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

FileFetcher = Callable[[str], "str | None"]  # file name -> local path, or None when absent


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_tokenizer(fetch: FileFetcher):
    """A transformers tokenizer for the checkpoint whose files `fetch` resolves."""
    config_path = fetch("tokenizer_config.json")
    config = _read_json(config_path) if config_path else {}
    special = {k: config[k] for k in ("eos_token", "pad_token", "bos_token", "mask_token", "unk_token")
               if isinstance(config.get(k), str)}

    tokenizer_json = fetch("tokenizer.json")
    if tokenizer_json:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json, **special)
    else:
        vocab_path, merges_path = fetch("vocab.json"), fetch("merges.txt")
        if not (vocab_path and merges_path):
            raise FileNotFoundError("no tokenizer.json and no vocab.json + merges.txt")
        vocab = _read_json(vocab_path)
        with open(merges_path, encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().splitlines()
                      if line and not line.startswith("#version")]
        tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                                   eos_token=None, pad_token=None)
        _restore_added_tokens(tokenizer, fetch, config)  # before naming them, so ids come out right
        for role, content in special.items():
            setattr(tokenizer, role, content)
    return tokenizer


def _restore_added_tokens(tokenizer, fetch: FileFetcher, config: dict) -> None:
    """Add the checkpoint's special tokens at the ids its files give them, in id order."""
    added: dict[str, int] = {}
    added_path = fetch("added_tokens.json")
    if added_path:
        added.update(_read_json(added_path))
    for token_id, entry in config.get("added_tokens_decoder", {}).items():
        added.setdefault(entry["content"], int(token_id))
    for content, token_id in sorted(added.items(), key=lambda kv: kv[1]):
        if tokenizer.convert_tokens_to_ids(content) == token_id:
            continue
        tokenizer.add_special_tokens({"additional_special_tokens": [content]},
                                     replace_extra_special_tokens=False)
        got = tokenizer.convert_tokens_to_ids(content)
        if got != token_id:
            raise ValueError(f"special token {content!r} landed at id {got}, the checkpoint says {token_id}")
