"""`vlp launch`: start this machine's part of a run on the config's cluster (`--dry-run`: print every node's).

Every launcher ends up running the same `vlp train --config X [overrides]`
(as `python -m vlp train ...`) in every process; they differ only in how
processes are started and how they find each other. The files in launch/
are the ready-made versions of these commands; this fills them in for a
config's `launch` section so there is nothing to get wrong by hand. They ship
inside the package; `vlp launch init DIR` writes editable copies, which win
when vlp runs in DIR (vlp.core.shipped).

What can be checked before anything starts is: a DeepSpeed hostfile must list
`launch.nodes` hosts with `launch.procs_per_node` slots each (else DeepSpeed's
launcher, given a missing hostfile, trains on the local machine alone). For
SLURM, `logs/` (the script's --output folder) is made before `sbatch`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

from vlp.core.atomic import write_atomic
from vlp.core.config import LaunchConfig, RunConfig
from vlp.core.errors import UserError
from vlp.core.hosts import slurm_hostnames
from vlp.core.shipped import resolve, write_copies

WRITTEN_HOSTFILE = "logs/hostfile"  # where vlp writes one from launch.hosts or SLURM's allocation
HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)$")


def _train_args(config_path: str | None, overrides: list[str]) -> list[str]:
    args = ["-m", "vlp", "train"]
    if config_path:
        args += ["--config", config_path]
    # launch.* only shapes the commands; the trainer does not need it
    return args + [o for o in overrides if not o.startswith("launch.")]


def _torchrun(launch: LaunchConfig, node: int, train: list[str]) -> list[str]:
    return ["torchrun", f"--nnodes={launch.nodes}", f"--nproc_per_node={launch.procs_per_node}",
            f"--node_rank={node}", f"--master_addr={launch.master_addr}", f"--master_port={launch.master_port}",
            *train]


def _deepspeed(launch: LaunchConfig, node: int, train: list[str]) -> list[str]:
    hostfile = launch.hostfile or WRITTEN_HOSTFILE
    # --no_ssh: each node starts its own share (no passwordless ssh / pdsh needed).
    return ["deepspeed", f"--hostfile={hostfile}", "--no_ssh", f"--node_rank={node}",
            f"--master_addr={launch.master_addr}", f"--master_port={launch.master_port}",
            "--module", *train[1:]]


def _accelerate(launch: LaunchConfig, node: int, train: list[str]) -> list[str]:
    return ["accelerate", "launch", "--config_file", resolve("launch/accelerate_deepspeed.yaml"),
            f"--num_machines={launch.nodes}", f"--num_processes={launch.nodes * launch.procs_per_node}",
            f"--machine_rank={node}", f"--main_process_ip={launch.master_addr}",
            f"--main_process_port={launch.master_port}", *train]


def node_commands(cfg: RunConfig, config_path: str | None, overrides: list[str]) -> list[str]:
    """One shell line per node (or the single sbatch line for SLURM)."""
    launch = cfg.launch
    train = _train_args(config_path, overrides)
    if launch.launcher == "slurm":
        extra = [f"--{flag}={value}" for flag, value in (("partition", launch.partition), ("account", launch.account),
                                                         ("time", launch.time), ("cpus-per-task", launch.cpus_per_task))
                 if value is not None]
        if launch.env_setup:  # the job's environment carries it to the script, which runs it before vlp
            extra.append(f"--export=ALL,VLP_ENV_SETUP={launch.env_setup}")
        line = ["sbatch", f"--nodes={launch.nodes}", f"--gpus-per-node={launch.procs_per_node}", *extra,
                resolve("launch/slurm.sbatch"), *train[3:]]
        return [shlex.join(line)]
    build = {"torchrun": _torchrun, "deepspeed": _deepspeed, "accelerate": _accelerate}[launch.launcher]
    lines = [shlex.join(build(launch, node, train)) for node in range(launch.nodes)]
    if launch.env_setup:  # the environment first, in the same shell
        lines = [f"{launch.env_setup} && {line}" for line in lines]
    return lines


def describe(cfg: RunConfig, config_path: str | None, overrides: list[str]) -> str:
    launch = cfg.launch
    world = launch.nodes * launch.procs_per_node
    head = (f"# {launch.launcher}: {launch.nodes} node(s) x {launch.procs_per_node} process(es) = {world} ranks; "
            f"contrastive batch {cfg.train.batch_size} per rank = {cfg.train.batch_size * world} global")
    lines = [head]
    commands = node_commands(cfg, config_path, overrides)
    if launch.launcher == "deepspeed":
        where = launch.hostfile or f"{WRITTEN_HOSTFILE} (written by vlp launch)"
        lines.append(f"# hostfile {where}: {', '.join(hostfile_hosts(launch))}, {launch.procs_per_node} slot(s) each")
    if launch.launcher == "slurm":
        lines.append("# submit once (after mkdir -p logs); each node then runs one torchrun (see launch/slurm.sbatch):")
        lines += commands
    else:
        for node, command in enumerate(commands):
            lines.append(f"# node {node}{' (master: ' + launch.master_addr + ')' if node == 0 else ''}:")
            lines.append(command)
    return "\n".join(lines)


def hostfile_hosts(launch: LaunchConfig) -> list[str]:
    """The hosts DeepSpeed will use, checked against the config, or a one-line UserError.

    From `launch.hostfile` when given; else from `launch.hosts`, or under SLURM from the
    allocation (`scontrol show hostnames`), for `write_hostfile` to write.
    """
    if not launch.hostfile:
        hosts = launch.hosts
        if not hosts and os.environ.get("SLURM_JOB_NODELIST"):
            hosts = slurm_hostnames(os.environ["SLURM_JOB_NODELIST"])
        if not hosts:
            raise UserError("launch.launcher=deepspeed needs launch.hosts (vlp writes the hostfile) or "
                            "launch.hostfile; without one DeepSpeed silently trains on this machine alone")
        if len(hosts) != launch.nodes:
            raise UserError(f"launch.hosts names {len(hosts)} host(s), launch.nodes is {launch.nodes}")
        return list(hosts)
    path = Path(launch.hostfile)
    if not path.is_file():
        raise UserError(f"launch.hostfile {path}: no such file (DeepSpeed would silently train on this machine "
                        f"alone); write one 'host slots={launch.procs_per_node}' line per node, or give launch.hosts")
    hosts = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = HOSTFILE_LINE.match(line)
        if not m:
            raise UserError(f"launch.hostfile {path} line {n}: expected 'host slots=N', got {line[:60]!r}")
        if int(m.group(2)) != launch.procs_per_node:
            raise UserError(f"launch.hostfile {path} line {n}: {m.group(1)} has slots={m.group(2)}, "
                            f"launch.procs_per_node is {launch.procs_per_node}")
        hosts.append(m.group(1))
    if len(hosts) != launch.nodes:
        raise UserError(f"launch.hostfile {path} lists {len(hosts)} host(s), launch.nodes is {launch.nodes}")
    return hosts


def write_hostfile(launch: LaunchConfig, hosts: list[str]) -> None:
    """logs/hostfile for DeepSpeed's launcher, when the config gave hosts rather than a file."""
    if not launch.hostfile:
        Path(WRITTEN_HOSTFILE).parent.mkdir(exist_ok=True)
        write_atomic(Path(WRITTEN_HOSTFILE), "".join(f"{h} slots={launch.procs_per_node}\n" for h in hosts))


def run_this_node(cfg: RunConfig, config_path: str | None, overrides: list[str]) -> None:
    """Replace this process with this machine's launch command (for SLURM: the submission)."""
    launch = cfg.launch
    if launch.launcher == "deepspeed":
        write_hostfile(launch, hostfile_hosts(launch))
    if launch.launcher == "slurm":
        Path("logs").mkdir(exist_ok=True)  # sbatch's --output=logs/%x-%j.out needs it before the job starts
        argv = shlex.split(node_commands(cfg, config_path, overrides)[0])
    elif launch.env_setup:  # one shell runs the environment line, then the launcher
        argv = ["bash", "-c", node_commands(cfg, config_path, overrides)[launch.node_rank]]
    else:
        argv = shlex.split(node_commands(cfg, config_path, overrides)[launch.node_rank])
    if shutil.which(argv[0]) is None:
        raise UserError(f"{argv[0]} not found on PATH (launch.launcher={launch.launcher})")
    print(f"# {shlex.join(argv)}", flush=True)
    os.execvp(argv[0], argv)


def init(dest: str) -> str:
    """`vlp launch init DIR`: editable copies of the presets and launch files, and what to do next."""
    written = write_copies(dest)
    return "\n".join([f"wrote {len(written)} files under {dest}/ (configs/, launch/):",
                      *(f"  {p}" for p in written),
                      f"edit them, then from {dest}/: vlp launch --config configs/vit-b-16-gpu.yaml --dry-run "
                      "(your copies win over the shipped ones)"])
