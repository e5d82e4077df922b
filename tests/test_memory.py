"""A process serving jobs keeps its memory bounded.

torch's bfloat16 matrix multiplies on a CPU keep a compiled kernel per input shape, and every canvas
length is a new shape (diffu_lsp/models/backend.py, KERNEL_CACHE_ENTRIES). Measured here as glibc's
count of bytes in use (mallinfo2: live allocations, not RSS, which also holds freed pages) across
forwards of new lengths in a fresh process: once the kernel caches are full, more new lengths add
next to nothing.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

FORWARDS = 30  # of new lengths, to fill the caches, then as many again to measure

IN_USE = """
import ctypes, json, random
import torch
from diffu_lsp.models import load_model

torch.set_num_threads(1)

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info

def in_use():  # bytes glibc has handed out and not had back: live heap, not RSS
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd

model = load_model(None, device="cpu", dtype="bfloat16")
"""  # the head of each measuring script: a fresh process, the bundled model in bfloat16

SCRIPT = IN_USE + f"""
length = 200

def forwards(count):
    global length
    for _ in range(count):
        length += 1
        canvas = torch.full((length,), 100, dtype=torch.long)
        canvas[-20:] = model.mask_token_id
        model.position_logits(canvas, torch.arange(length - 20, length))

forwards({FORWARDS})
before = in_use()
forwards({FORWARDS})
print(json.dumps({{"grew_mib": (in_use() - before) / 2**20}}))
"""


def needs_glibc(function: str, which: str = "") -> None:
    """Skip the test without glibc's ``function`` (``which``: the release that brought it)."""
    try:
        getattr(ctypes.CDLL("libc.so.6"), function)
    except (OSError, AttributeError):
        pytest.skip(f"needs glibc's {function}{which}")


def measured(script: str, **env: str) -> dict:
    """Run a measuring script in a fresh process on one thread (``env`` on top of ours; the kernel
    cache sizes only if given there): its last line, a JSON object."""
    clean = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    done = subprocess.run([sys.executable, "-c", script], env={**clean, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def growth_mib(**cache_sizes: str) -> float:
    """MiB more in use after FORWARDS forwards of new canvas lengths, in a fresh process whose
    environment sets these cache sizes (none: the backend's own)."""
    return measured(SCRIPT, **cache_sizes)["grew_mib"]


def test_new_canvas_lengths_do_not_grow_the_kernel_caches():
    needs_glibc("mallinfo2", " (2.33 or later)")
    # torch's own sizes: on a CPU whose bfloat16 multiplies compile a kernel per shape, this grows
    grown_at_torch_default = growth_mib(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="1024")
    if grown_at_torch_default < 40:
        pytest.skip(f"this CPU's bfloat16 multiplies keep no kernel per shape (+{grown_at_torch_default:.0f} MiB)")
    grown = growth_mib()
    assert grown < 15, (f"{FORWARDS} forwards of new canvas lengths kept {grown:.0f} MiB more "
                        f"(at torch's own cache sizes {grown_at_torch_default:.0f} MiB)")


TRIM_SCRIPT = """
import asyncio, ctypes, json
from diffu_lsp import job_host
from diffu_lsp.job import ModelKey, Request
from diffu_lsp.models import load_model
from diffu_lsp.protocol import Submit
from diffu_lsp.settings import Settings

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

key = ModelKey(None, "cpu", "float32")
held = job_host.HeldModel(key, load_model(None, device="cpu", dtype="float32"))
text = "def add(a, b):\\n    return "
request = Request("suggest", text, len(text), len(text), Settings())

def job(number):
    # one Submit frame through the daemon's JobHost, answered, its worker's housekeeping done
    async def run():
        host = job_host.JobHost()
        _, answer = host.submit(held, Submit(number, "doc", key, request), lambda frame: None, key="doc")
        assert type(await answer).__name__ == "Result"
        await host.sched.close()
    asyncio.run(run())

job(1)  # its kernels and buffers made: the second job makes none

# 200 MiB of the heap freed where the job cannot give it back by itself: a small block kept after
# every 3 MiB freed (below the mmap threshold, as most of a job's allocations)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 * 1024) for _ in range(3200)]
for block in blocks:
    ctypes.memset(block, 1, 64 * 1024)
kept = blocks[47::48]
for index, block in enumerate(blocks):
    if index % 48 != 47:
        libc.free(block)
before = rss_mib()
job_host.TRIM_SECONDS = 0  # the job just before trimmed a moment ago
job(2)
print(json.dumps({"released_mib": before - rss_mib()}))
"""


def test_a_job_gives_freed_heap_memory_back():
    """glibc keeps freed memory that a live block sits above; after a job the daemon's worker gives
    it back (job_host.trim_heap), or its RSS holds every page a job ever freed."""
    needs_glibc("malloc_trim")
    released = measured(TRIM_SCRIPT)["released_mib"]
    assert released > 100, f"a job gave back {released:.0f} of the 196 MiB freed before it"


ATTENTION_SCRIPT = IN_USE + """
from diffu_lsp.models.backend import KVBuffer
chosen = random.Random(0)

@torch.no_grad()
def steps(lengths):
    # as a cached job's steps: a full forward fills the keys/values of a canvas, then forwards of
    # some of its rows attend over all of them: a new (query rows, key rows) pair each
    for length in lengths:
        ids = torch.randint(2, 4000, (1, length), generator=torch.Generator().manual_seed(length))
        buffer = KVBuffer()
        model.forward(input_ids=ids, position_ids=torch.arange(length)[None], use_cache=True,
                      logits_to_keep=torch.arange(1), **{model.cache_keyword: buffer})
        for count in chosen.sample(range(1, 100), 10):
            buffer.rows = torch.arange(length - count, length)
            model.forward(input_ids=ids[:, buffer.rows], position_ids=buffer.rows[None], use_cache=True,
                          logits_to_keep=torch.arange(1), **{model.cache_keyword: buffer})

lengths = chosen.sample(range(300, 700), 80)
steps(lengths[:40])
before = in_use()
steps(lengths[40:])
print(json.dumps({"grew_mib": (in_use() - before) / 2**20}))
"""


def test_new_attention_shapes_do_not_grow_the_heap():
    """torch's CPU flash attention keeps a kernel per (query rows, key rows) pair in a map it never
    empties; the backend runs bfloat16 CPU attention at a few bucket sizes (backend.BUCKETED_DTYPES),
    so 400 more new pairs, after 400, add next to nothing."""
    needs_glibc("mallinfo2", " (2.33 or later)")
    grown = measured(ATTENTION_SCRIPT)["grew_mib"]
    assert grown < 4, f"400 forwards of new (query rows, key rows) pairs kept {grown:.1f} MiB more"


@pytest.mark.parametrize("queries, keys, key_heads", [(37, 203, 2), (16, 16, 4), (5, 130, 1)])
def test_bucketed_attention_gives_the_exact_attention(queries, keys, key_heads):
    """The bucket sizes change which kernel runs, not what it computes: bfloat16 CPU attention with
    padded query and key rows (the padded keys masked off), grouped heads too, against attention
    at the real sizes in float32, to bfloat16's rounding."""
    import torch

    from diffu_lsp.models.backend import attention_bucket, sdpa_attention

    assert (attention_bucket(queries), attention_bucket(keys)) != (queries, keys) or queries == 16
    generator = torch.Generator().manual_seed(queries * keys)
    query = torch.randn(1, 4, queries, 32, generator=generator)
    key = torch.randn(1, key_heads, keys, 32, generator=generator)
    value = torch.randn(1, key_heads, keys, 32, generator=generator) + 4  # a padded key let through pulls to 0
    module = torch.nn.Module().eval()
    out, _ = sdpa_attention(module, query.bfloat16(), key.bfloat16(), value.bfloat16(), None, is_causal=False)
    groups = 4 // key_heads
    weights = (query @ key.repeat_interleave(groups, 1).transpose(2, 3) / 32 ** 0.5).softmax(-1)
    exact = (weights @ value.repeat_interleave(groups, 1)).transpose(1, 2)
    assert out.shape == exact.shape
    assert (out.float() - exact).abs().max() < 0.04
