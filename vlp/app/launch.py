"""`vlp launch --dry-run`: the exact command each node runs, for the cluster in the config.

Every launcher ends up running the same `vlp train --config X [overrides]`
(as `python -m vlp train ...`) in every process; they differ only in how
processes are started and how they find each other. The files in launch/
are the ready-made versions of these commands; this prints them filled in
for a config's `launch` section so there is nothing to get wrong by hand.
"""

from __future__ import annotations

import shlex

from vlp.core.config import LaunchConfig, RunConfig


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
    hostfile = launch.hostfile or "launch/hostfile"
    # --no_ssh: each node starts its own share (no passwordless ssh / pdsh needed).
    return ["deepspeed", f"--hostfile={hostfile}", "--no_ssh", f"--node_rank={node}",
            f"--master_addr={launch.master_addr}", f"--master_port={launch.master_port}",
            "--module", *train[1:]]


def _accelerate(launch: LaunchConfig, node: int, train: list[str]) -> list[str]:
    return ["accelerate", "launch", "--config_file", "launch/accelerate_deepspeed.yaml",
            f"--num_machines={launch.nodes}", f"--num_processes={launch.nodes * launch.procs_per_node}",
            f"--machine_rank={node}", f"--main_process_ip={launch.master_addr}",
            f"--main_process_port={launch.master_port}", *train]


def node_commands(cfg: RunConfig, config_path: str | None, overrides: list[str]) -> list[str]:
    """One shell line per node (or the single sbatch line for SLURM)."""
    launch = cfg.launch
    train = _train_args(config_path, overrides)
    if launch.launcher == "slurm":
        line = ["sbatch", f"--nodes={launch.nodes}", f"--gpus-per-node={launch.procs_per_node}",
                "launch/slurm.sbatch", *train[3:]]
        return [shlex.join(line)]
    build = {"torchrun": _torchrun, "deepspeed": _deepspeed, "accelerate": _accelerate}[launch.launcher]
    return [shlex.join(build(launch, node, train)) for node in range(launch.nodes)]


def describe(cfg: RunConfig, config_path: str | None, overrides: list[str]) -> str:
    launch = cfg.launch
    world = launch.nodes * launch.procs_per_node
    head = (f"# {launch.launcher}: {launch.nodes} node(s) x {launch.procs_per_node} process(es) = {world} ranks; "
            f"contrastive batch {cfg.train.batch_size} per rank = {cfg.train.batch_size * world} global")
    lines = [head]
    commands = node_commands(cfg, config_path, overrides)
    if launch.launcher == "slurm":
        lines.append("# submit once; each node then runs one torchrun (see launch/slurm.sbatch):")
        lines += commands
    else:
        for node, command in enumerate(commands):
            lines.append(f"# node {node}{' (master: ' + launch.master_addr + ')' if node == 0 else ''}:")
            lines.append(command)
    return "\n".join(lines)
