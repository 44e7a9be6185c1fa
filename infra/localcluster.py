"""A real multi-node Ray cluster on this machine, started with `ray start` on 127.0.0.1.

Used by the ops tests and for trying `gammaray submit` without a cloud account:

    python -m infra.localcluster --nodes 2 --cpus 2     # prints the dashboard URL and token file

Every node is a separate `ray start` (a head plus `--address=` workers), each with its own ports
and its own temp dir under one private folder (nodes sharing a temp dir share the session dir, and
then one node's runtime-env agent re-extracts a job's working_dir while the other node's driver
imports from it). Token authentication is on (a fresh token in a file inside that
temp dir, `RAY_AUTH_TOKEN_PATH`), so the cluster refuses clients without it.

Tear-down kills exactly the processes this object started: every `ray start` runs in a new session
(`start_new_session=True`), Ray's daemons and workers inherit that session id, and `stop()`
terminates the processes whose session id is one of ours or whose command line names our private
temp dir. It never runs `ray stop`, which kills every Ray process on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

# variables of the caller that must not leak into the cluster's processes: another cluster's
# address or token, and the caller's object-storage credentials (a node gets only what `env` says)
_STRIP_ENV_PREFIXES = ("RAY_ADDRESS", "RAY_AUTH_", "RAY_API_SERVER", "AWS_", "RAY_JOB_", "RAY_RUNTIME_ENV_")


# `ray start` for a node that joins a head on 127.0.0.1 and stays on 127.0.0.1 itself. Stock Ray on
# Linux maps "127.0.0.1" to the network interface's address (services.resolve_ip_for_localhost)
# unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with that variable `ray start --address=...`
# refuses to start a second node. This keeps the loopback address in the `ray start` process (the
# node's own IP is then computed from the perspective of the head's 127.0.0.1 address) and sets the
# variable only for the daemons it spawns, so nothing of the node listens beyond 127.0.0.1.
_LOOPBACK_RAY_START = (
    "import os, sys\n"
    "from ray._private import services\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    "os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'] = '0'\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv[0] = 'ray'\n"
    "sys.exit(main())\n"
)


def _ray_binary() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "ray")
    if os.path.exists(here):
        return here
    found = shutil.which("ray")
    if not found:
        raise FileNotFoundError("the `ray` command is not installed (pip install 'ray[default]')")
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now (bound together, then released)."""
    socks, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class NodeHandle:
    session_id: int                      # the session id of the `ray start` that created the node
    ports: dict[str, int]
    log_path: str


@dataclass
class LocalRayCluster:
    """`with LocalRayCluster(nodes=2, cpus_per_node=2, env={...}) as c: c.dashboard_url, c.token`."""

    nodes: int = 2
    cpus_per_node: int = 2
    env: dict[str, str] = field(default_factory=dict)   # extra environment of every node (e.g. credentials)
    auth: bool = True                                    # token authentication (Ray's default)
    object_store_memory: int = 256 * 2**20
    startup_timeout_s: float = 120.0
    temp_dir: str = ""
    token: str = ""
    token_path: str = ""
    dashboard_url: str = ""
    dashboard_port: int = 0
    gcs_address: str = ""
    start_attempts: int = 3
    _nodes: list[NodeHandle] = field(default_factory=list)
    _all_sessions: set[int] = field(default_factory=set)  # every `ray start` ever run, failed ones too
    _own_tmp: bool = False

    # ---------------------------------------------------------------------------------------- start

    def node_temp_dir(self, index: int) -> str:
        return os.path.join(self.temp_dir, f"n{index}")

    def base_env(self, head: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_STRIP_ENV_PREFIXES)}
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        # a job's `python` must be the interpreter that runs Ray here (a venv is not on PATH by itself)
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        env.update({
            "RAY_USAGE_STATS_ENABLED": "0",
            # on a loaded 2-core machine the agents take a while to come up: the raylet's default
            # wait for them kills the node ("Timed out waiting for file ...agent_listen_port...")
            "RAY_agent_register_timeout_ms": "300000",
            "RAY_AUTH_MODE": "token" if self.auth else "disabled",
        })
        if self.auth:
            env["RAY_AUTH_TOKEN_PATH"] = self.token_path
        if self.dashboard_port:
            # Ray's state API (used inside Ray Train) otherwise looks for "the" local cluster and fails
            # with "Found multiple active Ray instances" when other clusters run on the machine
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{self.dashboard_port}"
        if head:
            # Ray resolves `--node-ip-address=127.0.0.1` to the network interface's address unless
            # this is 0 (docs/design.md section 9); the other nodes get it through _LOOPBACK_RAY_START
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        env.update(self.env)
        return env

    def start(self) -> "LocalRayCluster":
        if self.nodes < 1:
            raise ValueError("a cluster needs at least one node")
        if not self.temp_dir:
            # short: Ray's unix socket paths live below it and must stay under ~107 characters
            self.temp_dir = tempfile.mkdtemp(prefix="grc-", dir="/tmp")
            self._own_tmp = True
        os.makedirs(self.temp_dir, exist_ok=True)
        if self.auth:
            self.token = secrets.token_hex(32)
            self.token_path = os.path.join(self.temp_dir, "auth_token")
            with open(os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(self.token)
        try:
            self._start_node(head=True)
            for _ in range(self.nodes - 1):
                self._start_node(head=False)
            self.wait_for_nodes(self.nodes)
        except BaseException:
            # the error carries the `ray start` log tail; GAMMARAY_KEEP_CLUSTER_LOGS=1 keeps the whole temp dir
            self.stop(keep_logs=bool(os.environ.get("GAMMARAY_KEEP_CLUSTER_LOGS")))
            raise
        return self

    def _start_node(self, head: bool) -> None:
        """`ray start` one node; a node that misses Ray's fixed 30 s registration window (its agents
        start slowly on a loaded machine) is killed and started again, on fresh ports."""
        index = len(self._nodes)
        node_tmp = self.node_temp_dir(index)
        log_path = os.path.join(self.temp_dir, f"ray-start-{index}.log")
        last = ""
        for attempt in range(1, self.start_attempts + 1):
            handle, rc, last = self._ray_start(head, node_tmp, log_path)
            if rc == 0:
                self._nodes.append(handle)
                return
            self._kill_sessions({handle.session_id})
            if "timed out during startup" not in last:
                break
            print(f"[localcluster] node {index} missed Ray's startup window (attempt {attempt}); retrying",
                  file=sys.stderr, flush=True)
        raise RuntimeError(f"`ray start` failed for node {index}; log {log_path}:\n{last}")

    def _ray_start(self, head: bool, node_tmp: str, log_path: str) -> tuple[NodeHandle, int, str]:
        names = ["node_manager", "object_manager", "agent_listen", "agent_grpc", "runtime_env_agent", "metrics"]
        if head:
            names += ["gcs", "dashboard", "client_server"]
        ports = dict(zip(names, free_ports(len(names))))
        if head:
            self.dashboard_port = ports["dashboard"]
        os.makedirs(node_tmp, exist_ok=True)  # nodes must not share a session dir (module docstring)
        launcher = [_ray_binary()] if head else [sys.executable, "-c", _LOOPBACK_RAY_START]
        cmd = [
            *launcher, "start", f"--temp-dir={node_tmp}",
            f"--num-cpus={self.cpus_per_node}", "--num-gpus=0", f"--object-store-memory={self.object_store_memory}",
            f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
            f"--dashboard-agent-listen-port={ports['agent_listen']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--runtime-env-agent-port={ports['runtime_env_agent']}",
            f"--metrics-export-port={ports['metrics']}", "--disable-usage-stats",
        ]
        if head:
            cmd += ["--head", "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
                    f"--ray-client-server-port={ports['client_server']}"]
        else:
            cmd += [f"--address={self.gcs_address}"]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, env=self.base_env(head), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=node_tmp)
        handle = NodeHandle(session_id=proc.pid, ports=ports, log_path=log_path)
        self._all_sessions.add(proc.pid)
        try:
            rc = proc.wait(timeout=self.startup_timeout_s)
        except subprocess.TimeoutExpired:
            return handle, -1, f"`ray start` did not return in {self.startup_timeout_s}s (timed out during startup)"
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        if rc == 0 and head:
            self.gcs_address = f"127.0.0.1:{ports['gcs']}"
            self.dashboard_url = f"http://127.0.0.1:{ports['dashboard']}"
        return handle, rc, tail

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.auth else {}

    def wait_for_nodes(self, n: int) -> None:
        """Until the dashboard answers and `n` nodes are alive (the job API needs the head's agent)."""
        import requests

        deadline = time.monotonic() + self.startup_timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                r = requests.get(f"{self.dashboard_url}/nodes?view=summary", headers=self.auth_headers(), timeout=5)
                if r.ok:
                    summary = r.json()["data"]["summary"]
                    alive = [s for s in summary if s.get("raylet", {}).get("state") == "ALIVE"]
                    if len(alive) >= n:
                        r2 = requests.get(f"{self.dashboard_url}/api/jobs/", headers=self.auth_headers(), timeout=5)
                        if r2.ok:
                            return
                        last = f"jobs API {r2.status_code}"
                    else:
                        last = f"{len(alive)} of {n} nodes alive"
                else:
                    last = f"HTTP {r.status_code}"
            except Exception as err:  # noqa: BLE001 - not up yet
                last = repr(err)
            time.sleep(0.5)
        raise TimeoutError(f"cluster not ready after {self.startup_timeout_s}s: {last}; logs under {self.temp_dir}")

    # ----------------------------------------------------------------------------------------- stop

    def our_processes(self) -> list:
        """Processes started by this cluster: same session as one of our `ray start`s, or naming our temp dir."""
        import psutil

        sids = set(self._all_sessions)
        me = os.getpid()
        out = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if p.pid == me:
                continue
            try:
                mine = os.getsid(p.pid) in sids
                if not mine and self.temp_dir:
                    td = self.temp_dir.rstrip("/")
                    mine = any(part == td or part.endswith("=" + td) or td + "/" in part
                               for part in (p.info["cmdline"] or []))
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
            if mine:
                out.append(p)
        return out

    def _kill_sessions(self, sids: set[int], grace_s: float = 3.0) -> None:
        import psutil

        procs = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) in sids and p.pid != os.getpid():
                    procs.append(p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        _terminate(procs, grace_s)

    def stop(self, grace_s: float = 2.0, keep_logs: bool = False) -> None:
        import psutil

        procs = self.our_processes()
        _terminate(procs, grace_s)
        # a process may have been forked during the first sweep
        for p in self.our_processes():
            try:
                p.kill()
            except psutil.Error:
                pass
        self._nodes.clear()
        self._all_sessions.clear()
        if self._own_tmp and self.temp_dir and not keep_logs:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = ""

    def __enter__(self) -> "LocalRayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _terminate(procs: list, grace_s: float) -> None:
    """SIGTERM, wait up to grace_s, SIGKILL what is left."""
    import psutil

    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Run a local multi-node Ray cluster (token auth on) until Ctrl+C.")
    ap.add_argument("--nodes", type=int, default=2, help="number of nodes (head included)")
    ap.add_argument("--cpus", type=int, default=2, help="logical CPUs per node")
    ap.add_argument("--no-auth", action="store_true", help="disable token authentication")
    args = ap.parse_args()
    with LocalRayCluster(nodes=args.nodes, cpus_per_node=args.cpus, auth=not args.no_auth) as c:
        print(f"dashboard / job address: {c.dashboard_url}")
        print(f"GCS address:             {c.gcs_address}")
        if c.auth:
            print(f"token file:              {c.token_path}   (gammaray submit --token-file {c.token_path})")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
