"""A real two-node SLURM cluster on this machine, for the launch tests.

Debian's slurmctld + slurmd + munge. Each slurmd runs in its own Linux network
namespace (veth into a bridge, addresses 10.99.0.0/24 that this module creates
and removes), with its own hostname, so jobs see two hosts: node1 (10.99.0.11)
and node2 (10.99.0.12); slurmctld listens on the bridge (10.99.0.1). The
filesystem is shared, as on a real cluster. Needs root and the packages
(`apt-get install slurmctld slurmd slurm-client munge`); `.ci/run` installs them.

Settings that keep a test fast (measured): credentials expire after 20 s (the
default 120 s holds a requeued job that long), the scheduler runs every 5 s,
proctrack/pgid (linuxproc leaked background processes past a requeue).
Everything started here is stopped by pid, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from netns_hosts import Hosts
from netns_hosts import missing as netns_missing

HOSTS = Hosts(names=("node1", "node2"), subnet="10.99.0", bridge="vlpslbr0", prefix="vlpsn")
NODES = HOSTS.names
CPUS_PER_NODE = 4  # more than this machine has (config_overrides): three 2-node jobs fit at once

CONF = """\
ClusterName=vlptest
SlurmctldHost=localhost({ctl})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=20
CredType=cred/munge
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
MailProg=/bin/true
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def missing() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if netns_missing():
        return netns_missing()
    for tool in ("slurmctld", "slurmd", "sbatch", "munged", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install slurmctld slurmd slurm-client munge iproute2)"
    return None


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]  # the environment SLURM commands need (SLURM_CONF)
    pids: list[int]

    def run(self, *cmd: str, check: bool = True, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, check=check, capture_output=True, text=True, env=self.env, cwd=cwd)

    def job_state(self, job: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job).stdout
        return dict(part.split("=", 1) for part in out.split() if "=" in part)

    def wait_nodes_idle(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2], strict=False))
            if all(states.get(n, "").startswith("idle") for n in NODES):
                return
            time.sleep(0.5)
        raise AssertionError(f"SLURM nodes not idle: {self.run('sinfo', '-N', check=False).stdout}")


def _munge_up(root: Path) -> int | None:
    """Start munged unless one runs already; its pid if we started it."""
    if _sh("munge", "-n", check=False).returncode == 0:
        return None
    Path("/run/munge").mkdir(exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    _sh("runuser", "-u", "munge", "--", "munged", "--force")
    pidfile = Path("/run/munge/munged.pid")
    for _ in range(50):
        if pidfile.is_file():
            return int(pidfile.read_text())
        time.sleep(0.1)
    raise AssertionError("munged did not start")


def start(root: Path) -> Cluster:
    for sub in ("state", "log", "spool/node1", "spool/node2"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    nodes = "\n".join(f"NodeName={n} NodeAddr={HOSTS.addr(n)} CPUs={CPUS_PER_NODE} RealMemory=1000" for n in NODES)
    (root / "slurm.conf").write_text(CONF.format(ctl=f"{HOSTS.subnet}.1", d=root, nodes=nodes))
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    pids: list[int] = []
    HOSTS.up()
    munged = _munge_up(root)
    if munged:
        pids.append(munged)
    cluster = Cluster(root, env, pids)
    try:
        subprocess.run(["slurmctld"], env=env, check=True)
        for node in NODES:
            subprocess.run(HOSTS.enter(node, ["unshare", "--uts", "sh", "-c", f"hostname {node}; exec slurmd -N {node}"]),
                           env=env, check=True)
        for name in ("slurmctld", "slurmd-node1", "slurmd-node2"):
            pidfile = root / f"{name}.pid"
            for _ in range(100):
                if pidfile.is_file() and pidfile.read_text().strip():
                    break
                time.sleep(0.1)
            pids.append(int(pidfile.read_text()))
        cluster.wait_nodes_idle()
    except BaseException:
        stop(cluster)
        raise
    return cluster


def stop(cluster: Cluster) -> None:
    cluster.run("scancel", "--user=root", check=False)
    time.sleep(1)
    for pid in reversed(cluster.pids):  # slurmds, slurmctld, then munged (if ours)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
    HOSTS.down()
