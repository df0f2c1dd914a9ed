"""A real two-node Ray cluster on this machine, for the `--engine ray` tests.

The head runs in the root network namespace on a bridge address; the second
node runs in its own Linux network namespace (tests/netns_hosts.py, addresses
10.99.2.0/24 that this module creates and removes), so the two nodes really
talk over the network, as two machines would. The filesystem is shared, as on
a cluster with a shared filesystem.

What makes the namespace node work (measured with Ray 2.60): the head must
advertise the bridge address (`--node-ip-address`), not its default one, or
large object transfers from the namespace node hang; each node has its own
`--temp-dir`, and every client is given an explicit address, since the node
in the namespace overwrites Ray's current-cluster file.

The second node also has a mount namespace of its own, in which `private/`
(under the cluster's folder) is an empty tmpfs: files there are visible to the
head and to this process only, as on a machine without the shared filesystem.

Without the namespace tools (not root), `start(..., netns=False)` runs the
second node on the same host instead (loopback), and `private/` is shared.

Everything started here is stopped by process group and pid, never with
`ray stop`, which kills every Ray process on the machine.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import netns_hosts
import psutil

RAY = Path(sys.executable).parent / "ray"
HOSTS = netns_hosts.Hosts(names=("raynode2",), subnet="10.99.2", bridge="vlpraybr0", prefix="vlpray")
HEAD_IP = f"{HOSTS.subnet}.1"  # the bridge, in the root namespace
NODES_TIMEOUT = 120.0  # measured: ~12 s until both nodes are listed on an idle machine


def missing() -> str | None:
    """Why a Ray cluster cannot be started here, or None."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install 'vlp[ray]')"
    if not RAY.exists():
        return f"{RAY} not found"
    return None


def netns_missing() -> str | None:
    return netns_hosts.missing()


def env(token: str | None = None) -> dict[str, str]:
    """The environment of a node or client: no usage stats; this cluster's own token, when given."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out["RAY_USAGE_STATS_ENABLED"] = "0"
    if token:
        out.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str  # HEAD:PORT, what `--ray-address` takes
    root: Path
    netns: bool
    owns_network: bool = False  # start() brought the namespace and bridge up: stop() takes them down
    # Ray's token authentication, with a token of this cluster's own: a token left in ~/.ray by any
    # earlier `ray.init()` on this machine would otherwise switch it on for the nodes but not the clients
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    procs: list[subprocess.Popen] = field(default_factory=list)
    # node temp dirs: node -> its folder (worker logs, sessions)
    temp_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return env(self.token)

    @property
    def private(self) -> Path:
        """A folder the second node cannot see (with netns; see the module docstring)."""
        return self.root / "private"

    def logs(self) -> str:
        """The nodes' own output and the tails of their main logs, for a failure message."""
        parts = []
        for path in sorted(self.root.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        for node, temp in self.temp_dirs.items():
            for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err"):
                for path in temp.glob(f"session_latest/logs/{name}"):
                    parts.append(f"--- {node}/{name}\n{path.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)

    def nodes(self) -> int:
        """How many nodes `ray status` lists as active."""
        done = subprocess.run([str(RAY), "status", "--address", self.address], env=self.env, capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            return 0
        active = done.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return sum(1 for line in active.splitlines() if " node_" in line)

    def wait_nodes(self, n: int, timeout: float = NODES_TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while self.nodes() < n:
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > end:
                why = f"exited: {dead}" if dead else f"not {n} nodes after {timeout:.0f}s"
                raise AssertionError(f"Ray cluster did not start ({why})\n{self.logs()}")
            time.sleep(1.0)

    def worker_logs(self, node: str) -> str:
        """Everything the worker processes of one node wrote (Ray marks each task's output with its name)."""
        sessions = [p for p in self.temp_dirs[node].glob("session_*") if not p.is_symlink()]  # not session_latest
        return "".join(p.read_text(errors="replace") for session in sessions
                       for p in sorted(session.glob("logs/worker-*.out")))  # (.err has the same marks)


def _start_node(cluster: Cluster, name: str, argv: list[str], core: int | None = None, cpus: int = 1) -> None:
    # Ray's sockets live under its temp dir, and a Unix socket path is at most 107 bytes: a short folder
    # of our own under /tmp, not the test's (pytest-xdist's basetemp adds to its length)
    temp = Path(tempfile.mkdtemp(prefix=f"vr-{name}-", dir="/tmp"))
    cluster.temp_dirs[name] = temp
    log = open(cluster.root / f"{name}.log", "w")  # noqa: SIM115 - the node writes it while it runs
    cmd = [str(RAY), "start", *argv, f"--num-cpus={cpus}", "--disable-usage-stats", f"--temp-dir={temp}", "--block"]
    if core is not None:  # the node and everything it starts (raylet, workers) on one core: a machine of its own
        cmd = ["taskset", "-c", str(core), *cmd]
    if cluster.netns and name != "head":  # its own network, and an empty private/
        hide = f"mount -t tmpfs vlpray {shlex.quote(str(cluster.private))} && exec {shlex.join(cmd)}"
        cmd = HOSTS.enter(HOSTS.names[0], ["unshare", "--mount", "--propagation", "private", "sh", "-c", hide])
    # its own session and process group: stopped by killing that group, nothing else
    cluster.procs.append(subprocess.Popen(cmd, env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=cluster.root))
    log.close()


def start(root: Path, netns: bool = True, network_up: bool = False, nodes: int = 2, pinned: bool = False,
          head_cpus: int = 1) -> Cluster:
    """Head (1 CPU) + a second node (1 CPU); returns once `ray status` lists both. `network_up`: the
    namespace and bridge exist already (HOSTS.up() was called: something listens on the bridge).
    `nodes=1`: the head alone. `pinned`: the head's processes on core 0, the second node's on core 1
    (bench/shards.py's scaling figure: each node a core of its own, as separate machines would be).
    `head_cpus`: the CPUs the head offers (bench/shards.py's running one-node instance)."""
    if netns and not network_up:
        HOSTS.up()
    host = HEAD_IP if netns else "127.0.0.1"
    port = _free_port()
    # a caller that brought the network up keeps it for its next cluster (bench/shards.py's 1 then 2 nodes)
    cluster = Cluster(f"{host}:{port}", root, netns, owns_network=netns and not network_up)
    cluster.private.mkdir(parents=True, exist_ok=True)
    try:
        head = ["--head", f"--port={port}", "--include-dashboard=false"]
        # without namespaces every node is on loopback (Ray would advertise the machine's own interface)
        head.append(f"--node-ip-address={HEAD_IP if netns else '127.0.0.1'}")
        _start_node(cluster, "head", head, 0 if pinned else None, head_cpus)
        cluster.wait_nodes(1)
        if nodes == 2:
            node2 = [f"--address={cluster.address}"]
            node2.append(f"--node-ip-address={HOSTS.addr(HOSTS.names[0]) if netns else '127.0.0.1'}")
            _start_node(cluster, "node2", node2, 1 if pinned else None)
            cluster.wait_nodes(2)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """A started node and everything it started (some Ray processes leave its process group)."""
    try:
        top = psutil.Process(proc.pid)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop(cluster: Cluster) -> None:
    """Kill what this cluster started: each node's process group, then any descendant left over."""
    trees = [p for proc in cluster.procs for p in _tree(proc)]
    for proc in reversed(cluster.procs):  # the second node first, then the head
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in cluster.procs:  # a node drains for up to 30 s on SIGTERM: not worth waiting for here
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _, alive = psutil.wait_procs(trees, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    for temp in cluster.temp_dirs.values():  # the nodes' own folders under /tmp
        shutil.rmtree(temp, ignore_errors=True)
    if cluster.owns_network:
        HOSTS.down()
