"""``diffu-lsp cluster start | status | stop``: the two commands a team lead types."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import ClusterError, DEFAULT_PORT, new_token, read_state, read_token, state_file, token_file, write_state


RAY_PORT = 6379
STOP_SECONDS = 60
BATCH_SIZE = 0        # auto: app.GPU_BATCH_SIZE on a GPU, 1 (no batching) on a CPU; BENCHMARKS.md "cluster"
BATCH_WAIT_MS = 5.0


def ray_command() -> list[str]:
    script = Path(sys.executable).with_name("ray")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


def start(*, replicas: int = 1, model: str | None = None, device: str = "auto", dtype: str = "auto",
          gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0, threads: int = 0, host: str = "127.0.0.1",
          port: int = DEFAULT_PORT, address: str | None = None, num_cpus: int | None = None,
          batch_size: int = BATCH_SIZE, batch_wait_ms: float = BATCH_WAIT_MS, ssl_keyfile: str | None = None, ssl_certfile: str | None = None) -> dict:
    """Start a Ray head (or join ``address``), deploy the application, write the token; the state."""
    import ray
    from ray import serve

    from .app import APP_NAME, NAMESPACE, STATS_ACTOR, build, stats_actor_class

    started_head = address is None
    if started_head:
        command = ray_command() + ["start", "--head", f"--port={RAY_PORT}", "--include-dashboard=false",
                                   "--disable-usage-stats"]
        if num_cpus is not None:
            command.append(f"--num-cpus={num_cpus}")
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise ClusterError(f"`ray start --head` failed: {(done.stderr or done.stdout).strip()[-500:]}")
        address = f"127.0.0.1:{RAY_PORT}"
    token = new_token()
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    try:
        stats_actor_class().options(name=STATS_ACTOR, lifetime="detached", get_if_exists=True).remote()
        tls = {"ssl_keyfile": ssl_keyfile, "ssl_certfile": ssl_certfile} if ssl_keyfile and ssl_certfile else {}
        serve.start(http_options={"host": host, "port": port, **tls})
        serve.run(build(token, model=model, device=device, dtype=dtype, replicas=replicas,
                        gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica, threads=threads,
                        batch_size=batch_size, batch_wait_ms=batch_wait_ms),
                  name=APP_NAME, route_prefix="/")
    finally:
        ray.shutdown()
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    scheme = "https" if ssl_keyfile and ssl_certfile else "http"
    state = {"url": f"{scheme}://{shown_host}:{port}", "address": address, "started_head": started_head,
             "replicas": replicas, "model": model or "bundled tiny model", "device": device, "dtype": dtype,
             "gpus_per_replica": gpus_per_replica, "batch_size": batch_size, "batch_wait_ms": batch_wait_ms,
             "token_file": str(token_file()), "started": time.time()}
    write_state(state)
    return state


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
    except (OSError, ValueError, ClusterError) as error:
        result["message"] = f"the cluster does not answer at {state['url']}: {error}"
        return result
    result["running"] = True
    result["replica_stats"] = stats
    result["jobs_served"] = sum(r.get("answered", 0) for r in result["replica_stats"].values())
    result["replica_states"] = replica_states(state.get("address"))
    return result


def replica_states(address: str | None) -> dict:
    """Replica states as Ray Serve reports them ({"RUNNING": 2} ...); {} if Ray cannot be asked."""
    try:
        import ray
        from ray import serve

        from .app import APP_NAME, NAMESPACE

        ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False)
        try:
            app = serve.status().applications.get(APP_NAME)
            if app is None:
                return {}
            return {name: {str(k): v for k, v in d.replica_states.items()} for name, d in app.deployments.items()}
        finally:
            ray.shutdown()
    except Exception as error:  # noqa: BLE001 - status is best effort
        return {"error": str(error)}


def stop() -> dict:
    """Delete the application; if ``start`` started the Ray head here, stop Ray (no process left)."""
    state = read_state()
    if not state:  # never stop a Ray that `cluster start` did not start here
        return {"stopped": False, "message": f"no cluster started from this machine ({state_file()} is missing)"}
    started_head = bool(state.get("started_head"))
    if started_head:
        subprocess.run(ray_command() + ["stop", "--force"], capture_output=True, text=True, timeout=STOP_SECONDS)
    else:
        import ray
        from ray import serve

        from .app import APP_NAME, NAMESPACE, STATS_ACTOR

        ray.init(address=state.get("address") or "auto", namespace=NAMESPACE, log_to_driver=False)
        try:
            serve.delete(APP_NAME)
            try:
                ray.kill(ray.get_actor(STATS_ACTOR, namespace=NAMESPACE))
            except ValueError:
                pass
        finally:
            ray.shutdown()
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
                          num_cpus=args.num_cpus, batch_size=args.batch_size, batch_wait_ms=args.batch_wait_ms,
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
    except ClusterError as error:
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
    begin.add_argument("--host", default="127.0.0.1", help="HTTP bind address (127.0.0.1 unless you mean it)")
    begin.add_argument("--port", type=int, default=DEFAULT_PORT)
    begin.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this key (and --ssl-certfile)")
    begin.add_argument("--ssl-certfile", default=None)
    begin.add_argument("--address", default=None, help="join this Ray cluster (HEAD:6379) instead of starting one")
    show = commands.add_parser("status", help="url, replicas, model, jobs served, token file")
    show.add_argument("--json", action="store_true")
    commands.add_parser("stop", help="delete the application; stop Ray if `start` started it here")

