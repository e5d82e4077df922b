"""The cluster runner against a real local Ray (a head started by `cluster start`, 2 replicas of the
bundled model, half a CPU each): LSP servers through it, the token, cancellation reaching the
replica, a replica SIGKILLed mid-job, and `cluster stop` leaving no Ray process. The attacks of
#24 on it: Ray's own ports (as another local user, without Ray's token), unauthenticated and
undecodable requests, bodies that never arrive. One cluster for the module; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import encodings.idna  # noqa: F401 - for a child that drops to a uid that cannot read the standard library
import glob
import http.client
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import msgspec
import pytest

pytest.importorskip("ray")

from diffu_lsp.bench import common
from diffu_lsp.bench.lsp_client import LspClient  # noqa: E402
from diffu_lsp.cluster import read_token  # noqa: E402
from diffu_lsp.cluster import cli as cluster_cli  # noqa: E402
from diffu_lsp.cluster.client import ClusterEngine  # noqa: E402
from diffu_lsp.errors import ClusterLost, JobCancelled
from diffu_lsp.engine import LocalEngine  # noqa: E402
from diffu_lsp.job import ModelKey, Request, Suggestion  # noqa: E402
from diffu_lsp.scheduler import CancelToken  # noqa: E402
from diffu_lsp.settings import Settings  # noqa: E402

from test_runtime_security import OTHER, as_other_user  # noqa: E402

PORT = 8279
URL = f"http://127.0.0.1:{PORT}"
BUNDLED = ModelKey(None, "cpu", "float32")
SAMPLE = "import os\n\n\ndef read_config(path):\n    with open(path) as f:\n        return \n"
CURSOR = SAMPLE.index("return ") + len("return ")
# Long enough to be caught running: a big hole decoded one token per forward, no cache.
SLOW = {"algorithm": "entropy", "kvCache": "none", "singleLineTokens": 400, "multiLineTokens": 400,
        "earlyExit": False, "debounceMs": 0}


def ray_processes() -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid != os.getuid():
                continue
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(name in command for name in ("raylet", "gcs_server", "ray::", "/ray/", "ray.util.client",
                                            "default_worker.py")):
            found.append(f"{pid} {command[:120]}")
    return found


def listening_sockets(pids: set[str]) -> list[tuple[str, int, str]]:
    """(address, port, pid) of every TCP socket the processes ``pids`` listen on."""
    owner = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    owner[link[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] != "0A" or fields[9] not in owner:  # 0A: LISTEN
                continue
            hex_address, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_address)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((str(ipaddress.ip_address(raw)), int(hex_port, 16), owner[fields[9]]))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def wait_for(predicate, what: str, timeout: float = 60.0, every: float = 0.1):
    return common.wait_for(predicate, timeout, what, every)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if ray_processes():
        pytest.skip("a Ray cluster already runs on this machine")
    config = tmp_path_factory.mktemp("xdg")
    old = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(config)
    try:
        state = cluster_cli.start(replicas=2, device="cpu", dtype="float32", cpus_per_replica=0.5, threads=1,
                                  port=PORT, num_cpus=2, batch_size=4,
                                  # 50 ms, not the 5 ms default: on a loaded 2-core machine a job's thread
                                  # can take longer than 5 ms between its forwards, and then no forward
                                  # is ever shared (the batching test saw rows == batches == 14 so)
                                  batch_wait_ms=50)
        yield state
    finally:
        if ray_processes():
            cluster_cli.stop()
        if old is None:
            os.environ.pop("XDG_CONFIG_HOME", None)
        else:
            os.environ["XDG_CONFIG_HOME"] = old


def engine(**options) -> ClusterEngine:
    cluster = ClusterEngine(URL, **options)
    cluster.configure(Settings())
    cluster.load(BUNDLED)
    return cluster


def request(**settings) -> Request:
    return Request("suggest", SAMPLE, CURSOR, CURSOR, msgspec.convert(settings, Settings))


def replica_stats() -> dict:
    call = urllib.request.Request(URL + "/status", headers={"Authorization": f"Bearer {read_token()}"})
    with urllib.request.urlopen(call, timeout=30) as response:
        return msgspec.json.decode(response.read())["replicas"]


def start_slow_job(cluster: ClusterEngine, token: CancelToken) -> tuple[dict, list]:
    out: dict = {}
    steps: list = []

    def run():
        try:
            out["value"] = cluster.run(request(**SLOW), token, on_step=steps.append, key="file:///slow.py")
        except BaseException as error:  # noqa: BLE001
            out["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    out["thread"] = thread
    wait_for(lambda: len(steps) >= 3, "the slow job to run a few forwards")
    return out, steps


def test_the_token_file_is_owner_only_and_requests_without_it_get_401(cluster):
    token_file = Path(cluster["token_file"])
    assert token_file.stat().st_mode & 0o777 == 0o600
    before = sum(r["jobs"] for r in replica_stats().values())
    body = msgspec.json.encode({"key": "k", "request": request()})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": read_token()}):
        call = urllib.request.Request(URL + "/job", data=body, headers=headers, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(call, timeout=30)
        assert refused.value.code == 401
    assert sum(r["jobs"] for r in replica_stats().values()) == before  # nothing ran


async def open_window(tmp: Path, name: str, options: dict) -> LspClient:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp / "run"), "OMP_NUM_THREADS": "1"}
    client = LspClient([sys.executable, "-m", "diffu_lsp", "--device", "cpu", "--dtype", "float32"], env=env)
    await client.start()
    await client.initialize((tmp / name).as_uri(), options)
    return client


async def until_ready(client: LspClient, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, method, params in client.notifications:
            if method == "diffu/status" and params["state"] in ("ready", "error"):
                assert params["state"] == "ready", params
                return params
        await asyncio.sleep(0.05)
    raise AssertionError("the model did not become ready:\n" + "\n".join(client.stderr_tail))


@pytest.mark.asyncio
async def test_two_lsp_servers_get_suggestions_through_the_cluster_and_no_daemon_starts(cluster, tmp_path):
    windows = [await open_window(tmp_path, name, {"engine": URL}) for name in ("a", "b")]
    try:
        line = SAMPLE[:CURSOR].count("\n")
        character = CURSOR - SAMPLE.rindex("\n", 0, CURSOR) - 1
        for index, window in enumerate(windows):
            await until_ready(window)
            uri = f"file:///w{index}.py"
            window.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python",
                                                                    "version": 1, "text": SAMPLE}})
            result = await window.request("textDocument/inlineCompletion", {
                "textDocument": {"uri": uri}, "position": {"line": line, "character": character},
                "context": {"triggerKind": 1}}, timeout=120)
            items = result.get("items", []) if isinstance(result, dict) else result or []
            assert items and items[0]["insertText"]
            stats = await window.request("diffu/stats")
            assert stats["engine"] == "cluster" and stats["cluster_jobs"] >= 1
    finally:
        for window in windows:
            await window.close()
    folder = tmp_path / "run" / "diffu-lsp"
    assert not (folder / "daemon.sock").exists() and not (folder / "daemon.log").exists()  # no daemon started


def test_cancellation_reaches_the_replica_within_one_forward(cluster):
    cluster_engine = engine()
    token = CancelToken()
    out, steps = start_slow_job(cluster_engine, token)
    before = {pid: r["cancelled"] for pid, r in replica_stats().items()}
    token.cancel("superseded")
    out["thread"].join(30)
    assert isinstance(out.get("error"), JobCancelled) and not isinstance(out["error"], ClusterLost)
    pid = str(cluster_engine.replica_pid)

    def replica_counted():
        stats = replica_stats().get(pid, {})
        return stats if stats.get("cancelled", 0) > before.get(pid, 0) else None

    stats = wait_for(replica_counted, "the replica to count the cancelled job", timeout=30)
    assert stats["forwards_after_cancel_max"] <= 1
    assert len(steps) < 400  # it stopped long before the end
    assert "…" in steps[0].text  # the streamed draft: 399 positions still masked after the first step


def test_a_replica_keeps_each_documents_last_canvas_for_warm_start(cluster):
    cluster_engine = engine()
    drafted = []
    for _ in range(10):  # two replicas: the typed request must reach the one that kept the canvas
        first = cluster_engine.run(request(warmStart=True), CancelToken(), key="file:///warm.py")
        assert first.text
        typed = first.text[:2]
        text, cursor = SAMPLE[:CURSOR] + typed + SAMPLE[CURSOR:], CURSOR + len(typed)
        second = cluster_engine.run(Request("suggest", text, cursor, cursor, Settings(warm_start=True)), CancelToken(),
                                    key="file:///warm.py")
        drafted.append(second.drafted)
        if second.drafted:
            break
    assert drafted[-1] > 0, drafted
    cold = cluster_engine.run(Request("suggest", text, cursor, cursor, Settings()), CancelToken(),
                              key="file:///warm.py")
    assert cold.drafted == 0


def test_jobs_of_several_editors_run_batched_on_a_replica_and_each_cancel_stops_within_one_forward(cluster):
    engines = [engine() for _ in range(4)]
    before = replica_stats()
    runs = []
    for index, cluster_engine in enumerate(engines):  # 4 jobs on 2 replicas: at least 2 share one
        token, out, steps = CancelToken(), {}, []

        def run(cluster_engine=cluster_engine, token=token, out=out, steps=steps, index=index):
            try:
                out["value"] = cluster_engine.run(request(**SLOW), token, on_step=steps.append,
                                                  key=f"file:///editor{index}.py")
            except BaseException as error:  # noqa: BLE001
                out["error"] = error

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        runs.append((token, out, steps, thread))
    wait_for(lambda: all(len(steps) >= 3 for _, _, steps, _ in runs), "every job to run a few forwards", timeout=120)
    for token, _, _, _ in runs:
        token.cancel("superseded")
    for _, out, _, thread in runs:
        thread.join(30)
        assert isinstance(out.get("error"), JobCancelled)

    def all_counted():
        stats = replica_stats()
        cancelled = sum(r["cancelled"] for r in stats.values()) - sum(r["cancelled"] for r in before.values())
        return stats if cancelled >= 4 else None

    stats = wait_for(all_counted, "the replicas to count the 4 cancelled jobs", timeout=60)
    assert max(r["forwards_after_cancel_max"] for r in stats.values()) <= 1
    rows = sum(r.get("batched_rows", 0) - before.get(pid, {}).get("batched_rows", 0) for pid, r in stats.items())
    batches = sum(r.get("batches", 0) - before.get(pid, {}).get("batches", 0) for pid, r in stats.items())
    assert rows > batches > 0  # some forwards served two jobs or more


def test_a_replica_killed_mid_job_answers_it_and_the_next_request_is_served(cluster):
    messages: list[str] = []
    cluster_engine = engine(on_message=messages.append)
    token = CancelToken()
    out, _ = start_slow_job(cluster_engine, token)
    victim = cluster_engine.replica_pid
    os.kill(victim, signal.SIGKILL)
    out["thread"].join(60)
    assert not out["thread"].is_alive()
    assert isinstance(out.get("error"), ClusterLost)  # answered (empty), not hung
    assert len(messages) == 1 and "answered empty" in messages[0]
    answer = cluster_engine.run(request(), CancelToken(), key="file:///next.py")
    assert isinstance(answer, Suggestion) and cluster_engine.replica_pid != victim
    # Ray replaces the replica: a new pid serves alongside the survivor.
    states = wait_for(lambda: cluster_cli.replica_states().get("ModelReplica", {}).get("RUNNING") == 2,
                      "Ray to replace the killed replica", timeout=120, every=2)
    assert states
    status = cluster_cli.status()
    assert status["running"] and status["jobs_served"] >= 1 and status["url"] == URL


def test_a_silent_cluster_is_answered_empty_within_the_deadline(tmp_path, monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    token_file = tmp_path / "token"
    token_file.write_text("t\n")
    token_file.chmod(0o600)
    silent = ClusterEngine(f"http://127.0.0.1:{listener.getsockname()[1]}", token_file=str(token_file))
    silent.configure(msgspec.convert({"daemonDeadlineSeconds": 1.0, "engineTokenFile": str(token_file)}, Settings))
    started = time.monotonic()
    with pytest.raises(ClusterLost):
        silent.run(request(), CancelToken(), key="k")
    assert time.monotonic() - started < 5
    listener.close()


@pytest.mark.asyncio
async def test_a_server_whose_cluster_cannot_be_reached_falls_back_to_the_daemon_saying_so_once(tmp_path):
    from diffu_lsp.daemon import daemon_pid, runtime_paths, terminate

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    window = await open_window(tmp_path, "w", {"engine": f"http://127.0.0.1:{port}"})
    try:
        await until_ready(window)
        line = SAMPLE[:CURSOR].count("\n")
        character = CURSOR - SAMPLE.rindex("\n", 0, CURSOR) - 1
        window.notify("textDocument/didOpen", {"textDocument": {"uri": "file:///f.py", "languageId": "python",
                                                                "version": 1, "text": SAMPLE}})
        for _ in range(2):
            await window.request("textDocument/inlineCompletion", {
                "textDocument": {"uri": "file:///f.py"}, "position": {"line": line, "character": character},
                "context": {"triggerKind": 1}}, timeout=120)
        stats = await window.request("diffu/stats")
        assert stats["engine"].startswith("daemon") and stats["daemon_pid"]
        said = [p["message"] for _, m, p in window.notifications if m == "window/showMessage"]
        assert len([m for m in said if "cannot be reached" in m]) == 1, said
    finally:
        await window.close()
        os.environ["XDG_RUNTIME_DIR"], previous = str(tmp_path / "run"), os.environ.get("XDG_RUNTIME_DIR")
        try:
            paths = runtime_paths()
            if daemon_pid(paths):
                terminate(paths, timeout=10, sig=signal.SIGKILL)
        finally:
            if previous is None:
                os.environ.pop("XDG_RUNTIME_DIR")
            else:
                os.environ["XDG_RUNTIME_DIR"] = previous


ATTACK = """
import logging, os, sys
os.environ["HOME"] = sys.argv[1]
import ray
import ray.util.client.worker  # noqa: F401
logging.basicConfig(level=logging.WARNING)
logging.getLogger("ray.util.client.worker").setLevel(logging.DEBUG)


def whoami():
    return os.getuid()


def attempt(who, address):
    try:
        if address.startswith("ray://"):
            ray.util.connect(address[len("ray://"):], connection_retries=1)
        else:
            ray.init(address=address, log_to_driver=False)
        print(who, address, "RAN AS", ray.get(ray.remote(whoami).remote(), timeout=30), flush=True)
    except Exception as error:
        print(who, address, "REFUSED", type(error).__name__, flush=True)
    finally:
        if address.startswith("ray://"):
            ray.util.disconnect()
        else:
            ray.shutdown()


for address in sys.argv[3:]:  # without the token, as root first: that also imports what an attempt needs
    attempt("root", address)
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[2]))
for address in sys.argv[3:]:  # the GCS last: on a Ray without auth that attempt dies at the raylet's socket
    attempt("other", address)
"""


def test_ray_listens_on_loopback_only_and_without_its_token_runs_nothing(cluster, tmp_path, monkeypatch):
    """#24 finding 1: every port of the Ray that `cluster start` started is on 127.0.0.1, and a
    client without Ray's token, here another local user, can neither submit a job through the
    dashboard agent's job API nor connect a driver to the GCS."""
    sockets = listening_sockets({entry.split()[0] for entry in ray_processes()})
    assert {port for _, port, _ in sockets} >= {PORT, 6379} and 8265 not in {port for _, port, _ in sockets}
    assert [s for s in sockets if not is_loopback(s[0])] == []  # (address, port, pid)

    os.chmod(tmp_path, 0o777)
    proof = tmp_path / "ran"

    def submit_job():
        conn = http.client.HTTPConnection("127.0.0.1", 52365, timeout=20)  # Ray's default agent port
        conn.request("POST", "/api/job_agent/jobs/", body=msgspec.json.encode({"entrypoint": f"id > {proof}"}),
                     headers={"Content-Type": "application/json"})
        os._exit(0 if conn.getresponse().status in (401, 403) else 1)

    pid = as_other_user(submit_job)
    assert os.waitpid(pid, 0)[1] == 0  # refused
    time.sleep(2)
    assert not proof.exists()

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_AUTH_MODE="disabled", RAY_NUM_REDIS_GET_RETRIES="3")
    if cluster.get("node_ip") == "127.0.0.1":  # reach the GCS as the owner's own drivers do
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    home = tmp_path / "home"
    home.mkdir(mode=0o777)
    client, gcs = "ray://127.0.0.1:10001", cluster["address"]  # Ray's client server, the GCS
    done = subprocess.run([sys.executable, "-c", ATTACK, str(home), str(OTHER), client, gcs], env=env,
                          capture_output=True, text=True, timeout=180)
    said = done.stdout + done.stderr[-3000:]
    assert f"other {client} REFUSED" in done.stdout and f"other {gcs} REFUSED" in done.stdout, said
    assert "RAN AS" not in done.stdout, said
    assert "Unauthenticated" in done.stderr, said  # refused for the token, not for another reason
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    assert cluster_cli.requires_token(gcs)  # so `cluster start --address` to it would not warn


def test_requests_without_the_token_are_refused_before_they_reach_a_replica(cluster):
    """#24 finding 7: the 401 is decided in Serve's proxy (the gate); no replica's access log
    has the refused requests, while it has the authorized one sent after them."""
    flood, control = f"flood-{uuid.uuid4().hex}", f"control-{uuid.uuid4().hex}"
    for index, headers in enumerate([{}, {"Authorization": "Bearer wrong"}, {"Authorization": read_token()}] * 4):
        call = urllib.request.Request(URL + "/job", data=b"{}", method="POST",
                                      headers={**headers, "X-Request-ID": f"{flood}-{index}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(call, timeout=30)
        assert refused.value.code == 401
    call = urllib.request.Request(URL + "/info", headers={"Authorization": f"Bearer {read_token()}",
                                                          "X-Request-ID": control})
    with urllib.request.urlopen(call, timeout=30) as response:
        assert response.status == 200
    logs = f"{cluster.get('ray_temp_folder', '/tmp/ray')}/session_latest/logs/serve/replica_*.log"

    def replica_log() -> str:
        return "".join(Path(name).read_text(errors="replace") for name in glob.glob(logs))

    text = wait_for(lambda: (lambda t: t if control in t else None)(replica_log()), "the replica's access log")
    assert flood not in text


def test_a_body_that_is_not_a_job_gets_400_and_one_too_big_413(cluster):
    """#24 finding 7: undecodable bodies (not JSON, not UTF-8, JSON of the wrong shape) get 400, not
    500; a body announced bigger than 16 MiB gets 413 before any of it is read."""
    for body in (b"\xff\xfe{not json", b'{"key": 1, "request": {}}', b"[]"):
        call = urllib.request.Request(URL + "/job", data=body, method="POST",
                                      headers={"Authorization": f"Bearer {read_token()}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(call, timeout=30)
        assert refused.value.code == 400, refused.value.read()
    with socket.create_connection(("127.0.0.1", PORT), timeout=5) as sock:
        sock.sendall(f"POST /job HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {read_token()}\r\n"
                     f"Content-Length: {16 * 1024 * 1024 + 1}\r\n\r\n".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 413")


def test_clients_that_never_send_their_body_hold_no_replica_and_get_408(cluster):
    """#24 finding 7: more authorized clients than the replicas have slots (2 x 32) announce a body
    and never send it; a job is still answered at once, and each of them gets 408 after the
    gate's deadline."""
    from diffu_lsp.cluster.gate import BODY_SECONDS

    stalled = []
    for _ in range(70):
        sock = socket.create_connection(("127.0.0.1", PORT), timeout=BODY_SECONDS + 20)
        sock.sendall(f"POST /job HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {read_token()}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode())
        stalled.append(sock)
    try:
        started = time.monotonic()
        cluster_engine = ClusterEngine(URL)
        cluster_engine.configure(msgspec.convert({"daemonDeadlineSeconds": BODY_SECONDS}, Settings))
        assert isinstance(cluster_engine.run(request(), CancelToken(), key="file:///busy.py"), Suggestion)
        assert time.monotonic() - started < BODY_SECONDS
        for sock in stalled:
            assert sock.recv(100).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < BODY_SECONDS + 10
    finally:
        for sock in stalled:
            sock.close()


def test_cluster_stop_leaves_no_ray_process_and_servers_fall_back_saying_so_once(cluster):
    assert ray_processes()
    assert cluster_cli.stop()["stopped_ray"]
    assert wait_for(lambda: not ray_processes(), "every Ray process to exit", timeout=60), ray_processes()
    messages: list[str] = []
    gone = ClusterEngine(URL, on_message=messages.append, fallback=LocalEngine)
    gone.configure(Settings())
    gone.load(BUNDLED)
    for _ in range(2):
        assert isinstance(gone.run(request(), CancelToken(), key="k"), Suggestion)
    assert len(messages) == 1 and "cannot be reached" in messages[0]
    assert gone.describe()["engine"].startswith("daemon")


