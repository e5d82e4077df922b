"""``diffu-lsp cluster start | status | stop``: the two commands a team lead types.

Ray is locked down by default. The head that ``start`` starts runs with Ray's token authentication
on (``RAY_AUTH_MODE=token``, the token in ``ray-token``, see :func:`.ray_token`), in a private
0700 temp folder, without a dashboard unless ``--dashboard``, and with every port Ray opens on
127.0.0.1 unless ``--node-ip-address`` names an address other Ray nodes can reach: Ray's local-only
mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) keeps it from replacing 127.0.0.1 with the
machine's address. ``--host`` moves only the HTTP route editors use. Serve's proxy runs
:mod:`.gate` before any request reaches a replica. Everything that talks to Ray as a driver runs
in a child process with that environment (:func:`driver`), since Ray reads it at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import (DEFAULT_PORT, new_token, ray_token, ray_token_file, read_state, read_token, state_file, token_file,
               write_state)
from ..errors import ClusterUnavailable
from .gate import CALLBACK, TOKEN_FILE_ENV


RAY_PORT = 6379
LOOPBACK = "127.0.0.1"
STOP_SECONDS = 60
DRIVER_SECONDS = 300  # a deploy waits for every replica to load its model
PROBE_SECONDS = 60
BATCH_SIZE = 0        # auto: app.GPU_BATCH_SIZE on a GPU, 1 (no batching) on a CPU; BENCHMARKS.md "cluster"
BATCH_WAIT_MS = 5.0


def ray_command() -> list[str]:
    script = Path(sys.executable).with_name("ray")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


def ray_temp_folder() -> Path:
    """Ray's temp folder for a head started here (sockets, logs, runtime envs). Ray makes it mode
    777, so it lies inside a 0700 folder of ours (refused, never repaired, if another user made
    that one), short enough for Ray's socket paths."""
    from ..daemon import private_folder
    from ..errors import DaemonUnavailable

    folder = Path(tempfile.gettempdir()) / f"diffu-lsp-ray-{os.getuid()}"
    try:
        private_folder(folder)
    except DaemonUnavailable as error:
        raise ClusterUnavailable(str(error)) from None
    return folder / "ray"


def ray_environment(state: dict) -> dict:
    """The environment of every Ray process ``cluster`` starts, and of its drivers."""
    env = {**os.environ, TOKEN_FILE_ENV: str(token_file()), "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK}
    if state["started_head"]:
        env.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(ray_token_file()))
        if state["node_ip"] == LOOPBACK:
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # else Ray swaps 127.0.0.1 for the machine's address
    return env


def driver(state: dict, action: str, timeout: float = DRIVER_SECONDS, **options) -> dict:
    """Run ``action`` (deploy, states, delete; see :func:`driver_main`) as a Ray driver in a child
    process with :func:`ray_environment`; its JSON answer."""
    command = [sys.executable, "-m", "diffu_lsp.cluster.cli"]
    try:
        done = subprocess.run(command, input=json.dumps({"action": action, "state": state, "options": options}),
                              env=ray_environment(state), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ClusterUnavailable(f"Ray did not finish `{action}` within {timeout:.0f} s") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise ClusterUnavailable(f"`{action}` on Ray failed: {(done.stderr or done.stdout).strip()[-800:]}")
    return json.loads(lines[-1])


def requires_token(address: str) -> bool:
    """Whether the Ray cluster at ``address`` turns away a driver that has no token (False: anyone
    who reaches it can run code there)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    with tempfile.TemporaryDirectory() as home:  # no ~/.ray/auth_token either
        env.update(RAY_AUTH_MODE="disabled", HOME=home, RAY_NUM_REDIS_GET_RETRIES="5")
        probe = "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); ray.shutdown()"
        try:
            done = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True,
                                  timeout=PROBE_SECONDS)
        except subprocess.TimeoutExpired:
            return True
    return done.returncode != 0


def start(*, replicas: int = 1, model: str | None = None, device: str = "auto", dtype: str = "auto",
          gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0, threads: int = 0, host: str = LOOPBACK,
          port: int = DEFAULT_PORT, address: str | None = None, node_ip: str = LOOPBACK, num_cpus: int | None = None,
          dashboard: bool = False, batch_size: int = BATCH_SIZE, batch_wait_ms: float = BATCH_WAIT_MS,
          ssl_keyfile: str | None = None, ssl_certfile: str | None = None, warn=None) -> dict:
    """Start a locked-down Ray head (or join ``address``), deploy the application, write the token; the state."""
    warn = warn or (lambda message: print(f"diffu-lsp cluster: {message}", file=sys.stderr))
    started_head = address is None
    state = {"started_head": started_head, "node_ip": node_ip, "address": address}
    if started_head:
        ray_token()
        state["ray_temp_folder"] = str(ray_temp_folder())
        command = ray_command() + ["start", "--head", f"--port={RAY_PORT}", f"--node-ip-address={node_ip}",
                                   f"--temp-dir={state['ray_temp_folder']}", "--disable-usage-stats",
                                   f"--include-dashboard={'true' if dashboard else 'false'}"]
        if dashboard:
            command.append(f"--dashboard-host={LOOPBACK}")
        if num_cpus is not None:
            command.append(f"--num-cpus={num_cpus}")
        done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=ray_environment(state))
        if done.returncode != 0:
            raise ClusterUnavailable(f"`ray start --head` failed: {(done.stderr or done.stdout).strip()[-500:]}")
        state["address"] = f"{node_ip}:{RAY_PORT}"
    elif not requires_token(address):
        warn(f"the Ray cluster at {address} has no authentication: anyone who reaches its ports can run code "
             "there, as its owner (start its nodes with RAY_AUTH_MODE=token; README, \"For a team\")")
    new_token()
    tls = {"ssl_keyfile": ssl_keyfile, "ssl_certfile": ssl_certfile} if ssl_keyfile and ssl_certfile else {}
    try:
        driver(state, "deploy", http_options={"host": host, "port": port, **tls},
               app=dict(model=model, device=device, dtype=dtype, replicas=replicas, gpus_per_replica=gpus_per_replica,
                        cpus_per_replica=cpus_per_replica, threads=threads, batch_size=batch_size,
                        batch_wait_ms=batch_wait_ms))
    except BaseException:
        if started_head:  # no state is written, so `cluster stop` would not find this Ray: stop it now
            subprocess.run(ray_command() + ["stop", "--force"], capture_output=True, timeout=STOP_SECONDS,
                           env=ray_environment(state))
        raise
    shown_host = LOOPBACK if host in ("0.0.0.0", "::") else host
    scheme = "https" if tls else "http"
    state.update({"url": f"{scheme}://{shown_host}:{port}", "replicas": replicas,
                  "model": model or "bundled tiny model", "device": device, "dtype": dtype,
                  "gpus_per_replica": gpus_per_replica, "batch_size": batch_size, "batch_wait_ms": batch_wait_ms,
                  "token_file": str(token_file()), "started": time.time()})
    if started_head:
        state["ray_token_file"] = str(ray_token_file())
    write_state(state)
    return state


def driver_main() -> None:
    """The child of :func:`driver`: one action as a Ray driver; its answer as JSON on the last line."""
    request = json.load(sys.stdin)
    action, state, options = request["action"], request["state"], request["options"]
    import ray
    from ray import serve

    from .app import APP_NAME, NAMESPACE, STATS_ACTOR, build, stats_actor_class

    ray.init(address=state["address"], namespace=NAMESPACE, log_to_driver=False)
    try:
        if action == "deploy":
            stats_actor_class().options(name=STATS_ACTOR, lifetime="detached", get_if_exists=True).remote()
            serve.start(proxy_location="HeadOnly", http_options=options["http_options"])
            serve.run(build(read_token(), **options["app"]), name=APP_NAME, route_prefix="/")
            answer = {"deployed": True}
        elif action == "states":
            app = serve.status().applications.get(APP_NAME)
            answer = {} if app is None else {name: {str(k): v for k, v in d.replica_states.items()}
                                             for name, d in app.deployments.items()}
        elif action == "delete":
            serve.delete(APP_NAME)
            try:
                ray.kill(ray.get_actor(STATS_ACTOR, namespace=NAMESPACE))
            except ValueError:
                pass
            answer = {"deleted": True}
        else:
            raise ValueError(f"no such action: {action}")
    finally:
        ray.shutdown()
    print(json.dumps(answer), flush=True)


def replica_stats(url: str, timeout: float = 10.0) -> dict:
    """Each replica's counters (jobs, forwards, batches ...) from the cluster's ``/status``, with this
    machine's token."""
    import urllib.request

    request = urllib.request.Request(url + "/status", headers={"Authorization": f"Bearer {read_token()}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read()).get("replicas", {})


def status() -> dict:
    """The cluster as this machine knows it: url, replicas and their state, model, jobs served."""
    state = read_state()
    if not state:
        return {"running": False, "message": "no cluster started from this machine (no cluster.json)"}
    result = {**state, "running": False}
    try:
        stats = replica_stats(state["url"])
    except (OSError, ValueError, ClusterUnavailable) as error:
        result["message"] = f"the cluster does not answer at {state['url']}: {error}"
        return result
    result["running"] = True
    result["replica_stats"] = stats
    result["jobs_served"] = sum(r.get("answered", 0) for r in result["replica_stats"].values())
    result["replica_states"] = replica_states()
    return result


def replica_states() -> dict:
    """Replica states as Ray Serve reports them ({"RUNNING": 2} ...); {"error": ...} if Ray cannot be asked."""
    state = read_state()
    if not state:
        return {"error": "no cluster started from this machine"}
    try:
        return driver(state, "states", timeout=120)
    except ClusterUnavailable as error:  # status is best effort
        return {"error": str(error)}


def stop() -> dict:
    """Delete the application; if ``start`` started the Ray head here, stop Ray (no process left)."""
    state = read_state()
    if not state:  # never stop a Ray that `cluster start` did not start here
        return {"stopped": False, "message": f"no cluster started from this machine ({state_file()} is missing)"}
    started_head = bool(state.get("started_head"))
    if started_head:
        subprocess.run(ray_command() + ["stop", "--force"], capture_output=True, text=True, timeout=STOP_SECONDS,
                       env=ray_environment(state))
    else:
        driver(state, "delete", timeout=120)
    try:
        os.unlink(state_file())
    except FileNotFoundError:
        pass
    return {"stopped": True, "stopped_ray": started_head}


def main(args) -> int:
    try:
        if args.cluster_command == "start":
            state = start(replicas=args.replicas, model=args.model, device=args.device, dtype=args.dtype,
                          gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
                          threads=args.threads, host=args.host, port=args.port, address=args.address,
                          node_ip=args.node_ip_address, num_cpus=args.num_cpus, dashboard=args.dashboard,
                          batch_size=args.batch_size, batch_wait_ms=args.batch_wait_ms,
                          ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)
            print(f"diffu-lsp cluster: {state['replicas']} replica(s) of {state['model']} at {state['url']}")
            print(f"token: {state['token_file']} (owner-only; remote users copy it and set engineTokenFile)")
            print(f'editors: set "engine": "{state["url"]}"')
            return 0
        if args.cluster_command == "status":
            info = status()
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                for key in ("running", "url", "model", "replicas", "replica_states", "jobs_served", "token_file",
                            "message"):
                    if key in info:
                        print(f"{key}: {info[key]}")
            return 0 if info.get("running") else 1
        if args.cluster_command == "stop":
            print(json.dumps(stop()))
            return 0
    except ClusterUnavailable as error:
        print(f"diffu-lsp cluster: {error}", file=sys.stderr)
        return 2
    return 2


def add_parser(subparsers) -> None:
    cluster = subparsers.add_parser("cluster", help="the model engine as a Ray Serve application for a team")
    commands = cluster.add_subparsers(dest="cluster_command", required=True)
    begin = commands.add_parser("start", help="start (or join) Ray and deploy the model replicas")
    begin.add_argument("--replicas", type=int, default=1)
    begin.add_argument("--model", default=None, help="checkpoint (default: the bundled tiny model)")
    begin.add_argument("--device", default="auto")
    begin.add_argument("--dtype", default="auto")
    begin.add_argument("--gpus-per-replica", type=float, default=0.0)
    begin.add_argument("--cpus-per-replica", type=float, default=1.0)
    begin.add_argument("--threads", type=int, default=0, help="torch threads per replica (0: torch's default)")
    begin.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                       help="jobs a replica runs at once, their forwards batched into one (1: one job at a time, "
                            "with the K/V cache; batched jobs run uncached; 0, default: 8 on a GPU, 1 on a CPU)")
    begin.add_argument("--batch-wait-ms", type=float, default=BATCH_WAIT_MS,
                       help="longest a batch waits for the running jobs' next forwards")
    begin.add_argument("--num-cpus", type=int, default=None, help="CPUs the local Ray head offers")
    begin.add_argument("--host", default=LOOPBACK, help="the HTTP route's bind address, for editors (127.0.0.1 unless "
                       "you mean it; across a network, with TLS)")
    begin.add_argument("--port", type=int, default=DEFAULT_PORT)
    begin.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this key (and --ssl-certfile)")
    begin.add_argument("--ssl-certfile", default=None)
    begin.add_argument("--address", default=None, help="join this Ray cluster (HEAD:6379) instead of starting one "
                       "(warns if it has no authentication)")
    begin.add_argument("--node-ip-address", default=LOOPBACK,
                       help="the address Ray's own ports listen on (default 127.0.0.1: no other Ray node can join; "
                            "give a private-network address for a multi-node cluster)")
    begin.add_argument("--dashboard", action="store_true", help="start Ray's dashboard (on 127.0.0.1, token required)")
    show = commands.add_parser("status", help="url, replicas, model, jobs served, token file")
    show.add_argument("--json", action="store_true")
    commands.add_parser("stop", help="delete the application; stop Ray if `start` started it here")


if __name__ == "__main__":  # the child process of `driver`
    driver_main()
