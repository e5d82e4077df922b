"""cluster: simulated editors typing at once against the Ray Serve cluster (1 and 2 replicas)
and against the machine's model daemon, through the same engine contract the server uses.

Each simulated editor types ``--chars`` characters at ``--cps`` into its own document; every
keystroke cancels the editor's job still running (as the server's latest-wins does: the cluster
sees a disconnect, the daemon a Cancel frame) and submits a suggestion job for the new text.
Counted per run: answers (jobs that returned for the current text), superseded (cancelled by the
next keystroke; "late" of them: the answer came back but after the next keystroke, and is dropped
as the server drops it), stale (an answer kept for a text no longer current: must be 0), p50/p95 keystroke ->
suggestion for the answers, jobs answered per second, forwards per answered job (the job's own
steps), and network forwards per answered job (what the replicas ran, superseded jobs included:
with batching one network forward serves several jobs' steps).

Each replica count runs without batching (``--batch-size 1``: one job at a time, with the K/V
cache of the settings) and with it (``--batch-size 8``: up to 8 jobs at once, their forwards
batched, uncached); ``--batching on|off`` runs one of the two.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

from . import common

PORT = 8278
BATCH_ON = 8  # --batch-size of the "with batching" rows (the cluster's own default is 1 on a CPU)
TEXT = "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n        "
TYPED = "lines = [line.rstrip() for line in f if line.strip()]\n        return lines\n"


def per_answer(row: dict) -> str:
    return "unknown" if row["network_per_job"] is None else f"{row['network_per_job']:.1f}"


def network_forwards(url: str) -> int:
    """Forwards the cluster's replicas ran so far: batched forwards where batching is on, else job steps."""
    from ..cluster.cli import replica_stats

    replicas = replica_stats(url, timeout=120)  # a busy machine answers slowly
    return sum(r.get("batches", r.get("forwards", 0)) for r in replicas.values())


def editor(engine_for, index: int, chars: int, cps: float, out: list, ready: threading.Barrier) -> None:
    """One editor: type, cancel the previous job, submit a new one; results appended to ``out``."""
    from ..job import Request
    from ..errors import JobCancelled
    from ..scheduler import CancelToken
    from ..settings import Settings

    engine = engine_for()
    settings = Settings()
    current = {"version": 0}
    lock = threading.Lock()
    running: list[tuple[CancelToken, threading.Thread]] = []

    def job(version: int, text: str, typed_at: float, token: CancelToken) -> None:
        try:
            engine.run(Request("suggest", text, len(text), len(text), settings), token, key=f"editor{index}")
        except JobCancelled:
            out.append({"outcome": "superseded", "forwards": token.forwards})
            return
        except Exception as error:  # noqa: BLE001
            out.append({"outcome": "error", "error": repr(error)})
            return
        now = time.perf_counter()
        with lock:  # as the server: an answer for a superseded keystroke is dropped, never shown
            outcome = "late" if token.cancelled else "stale" if version != current["version"] else "answered"
        out.append({"outcome": outcome, "latency": now - typed_at, "forwards": token.forwards, "at": now})

    text = TEXT
    try:
        engine.run(Request("suggest", text, len(text), len(text), settings), CancelToken(), key=f"editor{index}")
        ready.wait(120)  # every editor warmed up (first job untimed), then all type at once
        for i in range(chars):
            text += TYPED[i % len(TYPED)]
            with lock:
                current["version"] = i + 1
                for token, _ in running:
                    token.cancel("superseded")
            token = CancelToken()
            thread = threading.Thread(target=job, args=(i + 1, text, time.perf_counter(), token), daemon=True)
            thread.start()
            running = [(t, th) for t, th in running if th.is_alive()] + [(token, thread)]
            time.sleep(1 / cps)
        for _, thread in running:
            thread.join(60)
    finally:
        engine.close()


def typing_run(engine_for, editors: int, chars: int, cps: float, counter=None) -> dict:
    """`counter()`: the network forwards the engine has run so far (None: each job step is one)."""
    out: list = []
    ready = threading.Barrier(editors + 1)
    threads = [threading.Thread(target=editor, args=(engine_for, i, chars, cps, out, ready), daemon=True)
               for i in range(editors)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 300
    while ready.n_waiting < editors and time.monotonic() < deadline:  # every editor warmed up, none typing yet
        time.sleep(0.05)
    before = counter() if counter else 0
    ready.wait(300)
    started = time.perf_counter()
    for thread in threads:
        thread.join(180)
    wall = time.perf_counter() - started
    time.sleep(0.5)  # the replicas count a cancelled job's forwards when it returns
    network = counter() - before if counter else sum(r.get("forwards", 0) for r in out)
    if network < 0:  # the replicas' counters went back (a replica replaced, or a report lost): unknown
        network = None
    answered = [r for r in out if r["outcome"] == "answered"]
    latencies = [r["latency"] for r in answered]
    return {
        "editors": editors, "jobs": len(out), "answered": len(answered),
        "superseded": sum(r["outcome"] in ("superseded", "late") for r in out),
        "late": sum(r["outcome"] == "late" for r in out),
        "stale": sum(r["outcome"] == "stale" for r in out), "errors": sum(r["outcome"] == "error" for r in out),
        "p50_ms": 1000 * common.percentile(latencies, 50) if latencies else None,
        "p95_ms": 1000 * common.percentile(latencies, 95) if latencies else None,
        "jobs_per_s": len(answered) / wall,
        "forwards_per_job": sum(r["forwards"] for r in answered) / len(answered) if answered else None,
        "network_per_job": network / len(answered) if answered and network is not None else None,
        "network_forwards": network, "job_forwards": sum(r.get("forwards", 0) for r in out),
        "first_error": next((r["error"] for r in out if r["outcome"] == "error"), ""),
    }


def run(options: common.Options) -> dict:
    from ..cluster import cli as cluster_cli
    from ..cluster.client import ClusterEngine
    from ..daemon import runtime_paths, terminate
    from ..daemon.client import DaemonEngine
    from ..job import ModelKey
    from ..settings import Settings

    started = time.perf_counter()
    key = ModelKey(options.model, options.device or "cpu", options.dtype or "float32")
    editor_counts = (1, 2) if options.quick else (1, 4, 8)
    chars = options.chars or (8 if options.quick else 24)
    cps = options.cps
    replica_counts = (1,) if options.quick else (1, 2)
    batching = options.extra.get("batching", "both")
    batch_sizes = {"both": (1, BATCH_ON), "on": (BATCH_ON,), "off": (1,)}[batching]
    runs: list[tuple[str, dict]] = []
    previous = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="diffu-bench-cluster-") as folder:
        os.environ.update(common.subprocess_env(options), XDG_RUNTIME_DIR=f"{folder}/run",
                          XDG_CONFIG_HOME=f"{folder}/config")
        try:
            for replicas, batch_size in [(r, b) for r in replica_counts for b in batch_sizes]:
                target = f"cluster, {replicas} replica(s), " + (f"batch {batch_size}" if batch_size > 1 else "no batching")
                common.progress(f"{target}: starting")
                cluster_cli.start(replicas=replicas, model=options.model, device=key.device, dtype=key.dtype,
                                  cpus_per_replica=0.5, threads=options.threads or 1, port=PORT,
                                  num_cpus=2 * max(replica_counts), batch_size=batch_size,
                                  batch_wait_ms=cluster_cli.BATCH_WAIT_MS)

                def cluster_engine() -> ClusterEngine:
                    engine = ClusterEngine(f"http://127.0.0.1:{PORT}")
                    engine.configure(Settings())
                    engine.load(key)
                    return engine

                try:
                    for editors in editor_counts:
                        common.progress(f"{target}: {editors} editor(s)")
                        runs.append((target, typing_run(cluster_engine, editors, chars, cps,
                                                        lambda: network_forwards(f"http://127.0.0.1:{PORT}"))))
                finally:
                    cluster_cli.stop()

            def daemon_engine() -> DaemonEngine:
                engine = DaemonEngine(paths=runtime_paths())
                engine.configure(Settings())
                engine.load(key)
                return engine

            try:
                for editors in editor_counts:
                    common.progress(f"cluster: {editors} editor(s), local daemon")
                    runs.append(("local daemon", typing_run(daemon_engine, editors, chars, cps)))
            finally:
                terminate(runtime_paths())
        finally:
            os.environ.clear()
            os.environ.update(previous)
    rows = [[target, r["editors"], r["jobs"], r["answered"], r["superseded"], r["late"], r["stale"], r["errors"], r["p50_ms"],
             r["p95_ms"], r["jobs_per_s"], r["forwards_per_job"], r["network_per_job"]] for target, r in runs]
    return {
        "suite": "cluster",
        "title": "Team cluster (Ray Serve) vs the local daemon",
        "tables": [common.table(
            f"Simulated editors typing {chars} characters each at {cps:g} chars/s, every keystroke superseding "
            "the editor's running job (ms). forwards/answer: the answered job's own steps; network forwards/answer: "
            "forwards the engine ran (superseded jobs included; a batched forward counts once) per answer",
            ["engine", "editors", "jobs", "answered", "superseded", "late", "stale", "errors", "p50", "p95", "answers/s",
             "forwards/answer", "network forwards/answer"], rows)],
        "summary": {"stale": sum(r["stale"] for _, r in runs), "errors": sum(r["errors"] for _, r in runs),
                    "first_error": next((r["first_error"] for _, r in runs if r["first_error"]), "")},
        "notes": notes(runs),
        "seconds": time.perf_counter() - started,
    }


def notes(runs: list[tuple[str, dict]]) -> list[str]:
    by = {(target, r["editors"]): r for target, r in runs}
    lines = [f"Stale answers (kept for a text no longer current): {sum(r['stale'] for _, r in runs)} in all rows."]
    one, daemon = by.get(("cluster, 1 replica(s), no batching", 1)), by.get(("local daemon", 1))
    if one and daemon and one["p50_ms"] is not None and daemon["p50_ms"] is not None:
        lines.append(f"One editor: the cluster answers in {one['p50_ms']:.0f} ms p50 against the daemon's "
                     f"{daemon['p50_ms']:.0f} ms (HTTP through Ray's proxy, one connection per job, against the "
                     "daemon's Unix socket).")
    for target, editors in by:
        if "batch " not in target:
            continue
        on, off = by[(target, editors)], by.get((target.split(", batch")[0] + ", no batching", editors))
        if not off or not on["answered"] or not off["answered"]:
            continue
        lines.append(
            f"{target.split(', batch')[0]}, {editors} editor(s): batching on vs off: answers/s "
            f"{off['jobs_per_s']:.2f} -> {on['jobs_per_s']:.2f}, p50 {off['p50_ms']:.0f} -> {on['p50_ms']:.0f} ms, "
            f"p95 {off['p95_ms']:.0f} -> {on['p95_ms']:.0f} ms, network forwards per answer "
            f"{per_answer(off)} -> {per_answer(on)}.")
    lines += [
        "Batching (diffu_lsp/models/batching.py): a replica with --batch-size N runs up to N jobs at once, each "
        "with its own sampler thread; their forwards are gathered (at once when every running job has asked, "
        "else at most --batch-wait-ms) into one right-padded forward, pad keys masked. Batched jobs run "
        "uncached (a K/V-cached step covers its own span of its own buffer; typing users' spans never match), "
        "so a batched job takes full forwards where an unbatched one (batch 1, kvCache delayed by default) "
        "takes cached ones. Batching pays where a forward of 8 canvases costs about one: expected on a GPU, where "
        "a 7B model's step over a few hundred tokens is bound by reading the weights (not measured here).",
        f"Machine load: {os.cpu_count()} cores shared by the editors, Ray's proxy and every replica (and whatever "
        "else runs): 2 replicas can only beat 1 where each gets its own GPU or cores, and on a CPU a forward of 8 "
        "canvases costs about 7 of one (tiny model, 120 tokens, 1 thread: 131 ms against 18 ms).",
        "Run with --threads 1 on a CPU: with torch's default threads per process, several processes on few "
        "cores oversubscribe them (a first run here: the daemon took seconds per job).",
        "Cancellation reaching the replica within one forward is checked by tests/test_cluster.py (forwards "
        "after cancel, counted on the replica, batching on) and tests/test_batching.py (a job cancelled in a "
        "batch: at most one forward after cancel, the others' tokens unchanged).",
    ]
    return lines
