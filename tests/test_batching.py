"""Forward batching (diffu_lsp/models/batching.py) on the bundled tiny model: exact, cancellable, bounded."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from diffu_lsp.scheduler import CancelToken
from diffu_lsp.models import load_model
from diffu_lsp.models.batching import ForwardBatcher
from diffu_lsp.errors import JobCancelled
from diffu_lsp.sampler import Sampling

PROMPTS = ["def add(a, b):\n    return ", "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n        ",
           "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        ", "for i in range(10):\n    "]
SAMPLING = Sampling(alg="threshold", threshold=0.9, temperature=0.0)


@pytest.fixture(scope="module")
def model():
    model = load_model(None, device="cpu", dtype="float32")
    torch.manual_seed(0)
    return model


def canvas_of(model, prompt: str, hole: int = 12) -> list[int]:
    return model.encode(prompt) + [model.mask_token_id] * hole + model.encode("\n\nprint(1)\n")


def test_a_padded_batch_gives_each_canvas_its_logits_alone(model):
    generator = torch.Generator().manual_seed(1)
    canvases = [torch.randint(0, 1000, (n,), generator=generator) for n in (41, 64, 7)]
    positions = [torch.tensor([0, 3, 40]), torch.tensor([10, 11, 63]), torch.tensor([2, 6])]
    batched = model.batch_position_logits(canvases, positions)
    for canvas, at, logits in zip(canvases, positions, batched):
        alone = model.position_logits(canvas, at)
        assert logits.shape == alone.shape
        torch.testing.assert_close(logits, alone, atol=1e-4, rtol=1e-4)
    # the padding matters: without the key mask the short canvas would see the pad tokens
    assert not torch.allclose(model.position_logits(torch.cat([canvases[2], torch.full((57,), model.mask_token_id)]),
                                                    positions[2]), batched[2], atol=1e-4)


def run_jobs(model, canvases, tokens, on_step=None):
    results = [None] * len(canvases)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, model.fill(
        canvases[i], SAMPLING, cancel=tokens[i], on_step=on_step and (lambda d, i=i: on_step(i, d)))))
        for i in range(len(canvases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def test_jobs_batched_together_give_the_tokens_each_gives_alone(model):
    canvases = [canvas_of(model, p, hole=8 + 4 * i) for i, p in enumerate(PROMPTS)]
    alone = [model.fill(c, SAMPLING) for c in canvases]
    batcher = model.batcher = ForwardBatcher(model, batch_size=8, wait_s=0.05)
    try:
        batched = run_jobs(model, canvases, [CancelToken() for _ in canvases])
    finally:
        model.batcher = None
    for one, together in zip(alone, batched):
        assert together.canvas.tolist() == one.canvas.tolist()
        assert together.forwards == one.forwards
    assert batcher.largest > 1 and batcher.batches < sum(r.forwards for r in alone)
    assert max(r.forwards for r in alone) >= 2


def test_a_job_cancelled_in_a_batch_stops_within_one_forward_and_the_others_finish_unchanged(model):
    canvases = [canvas_of(model, p, hole=16) for p in PROMPTS[:3]]
    alone = [model.fill(c, Sampling(alg="threshold", threshold=1.0)) for c in canvases]  # one token a forward
    batcher = model.batcher = ForwardBatcher(model, batch_size=8, wait_s=0.05)
    tokens = [CancelToken() for _ in canvases]

    def on_step(index, draft):
        if index == 1 and draft.step == 2:
            tokens[1].cancel("superseded")

    try:
        results = [None] * 3
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, model.fill(
            canvases[i], Sampling(alg="threshold", threshold=1.0), cancel=tokens[i],
            on_step=lambda d, i=i: on_step(i, d)))) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        model.batcher = None
    assert results[1].cancelled and tokens[1].forwards_after_cancel <= 1
    assert results[1].forwards == 2 < alone[1].forwards
    for i in (0, 2):
        assert not results[i].cancelled
        assert results[i].canvas.tolist() == alone[i].canvas.tolist()
    assert batcher.largest == 3  # they did run together


def test_the_gather_wait_is_bounded_and_a_lone_job_does_not_wait(model):
    batcher = ForwardBatcher(model, batch_size=8, wait_s=0.3)
    canvas, at = torch.tensor(canvas_of(model, PROMPTS[0])), torch.tensor([5, 6])
    with batcher.job():
        started = time.monotonic()
        batcher.position_logits(canvas, at)
        lone = time.monotonic() - started
        with batcher.job():  # a second job that is busy elsewhere: waited for, but only wait_s
            started = time.monotonic()
            batcher.position_logits(canvas, at)
            waited = time.monotonic() - started
    assert lone < 0.2
    assert 0.3 <= waited < 1.5
    assert batcher.batches == 2


def test_a_job_cancelled_while_its_request_waits_leaves_the_batch(model):
    batcher = ForwardBatcher(model, batch_size=8, wait_s=1.0)
    token = CancelToken()
    canvas, at = torch.tensor(canvas_of(model, PROMPTS[0])), torch.tensor([5])
    errors = []

    def ask():
        try:
            batcher.position_logits(canvas, at, token)
        except JobCancelled as error:
            errors.append(error)

    with batcher.job(), batcher.job():  # two jobs: the request waits up to 1 s for the other's
        thread = threading.Thread(target=ask)
        thread.start()
        time.sleep(0.1)
        started = time.monotonic()
        token.cancel("superseded")
        thread.join(5)
        left_after = time.monotonic() - started
    assert errors and batcher.left == 1
    assert left_after < 0.3
    time.sleep(0.05)
    assert batcher.batches == 0  # nothing ran for it


def test_a_scheduler_with_two_workers_runs_two_documents_at_once_and_latest_wins_per_document():
    import asyncio

    from diffu_lsp.errors import JobCancelled
    from diffu_lsp.scheduler import Scheduler

    both_running = threading.Barrier(2, timeout=5)

    def together(token):
        both_running.wait()  # only returns if the other job runs at the same time
        return "done"

    def until_cancelled(token):
        deadline = time.monotonic() + 5
        while not token.cancelled and time.monotonic() < deadline:
            time.sleep(0.005)
        return "not cancelled"

    async def main():
        sched = Scheduler(debounce_s=0, workers=2)
        a, b = sched.submit("a", together, debounce=False), sched.submit("b", together, debounce=False)
        assert await a == "done" and await b == "done"
        old = sched.submit("a", until_cancelled, debounce=False)
        await asyncio.sleep(0.05)
        new = sched.submit("a", lambda token: "new", debounce=False)
        with pytest.raises(JobCancelled):
            await old
        assert await new == "new"
        await sched.close()
        return sched.stats

    stats = asyncio.run(main())
    assert stats["completed"] == 3 and stats["superseded"] == 1
