"""Process-group plumbing that works under every launcher we support, plus the gathers the losses use.

Launchers announce rank and world size through different environment variables:
torchrun, the DeepSpeed launcher and `accelerate launch` set RANK / WORLD_SIZE /
LOCAL_RANK; SLURM's srun sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; OpenMPI's
mpirun sets OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK. `detect_env` reads whichever is
there (in that order), so the trainer never cares how it was started.

Backend: nccl when CUDA is present, gloo otherwise (that is how the tests run 2 ranks
on CPU). DeepSpeed picks its accelerator at import time and compiles ops with the ninja on PATH,
so `prepare_for_deepspeed` (accelerator + ninja)
must run before `import deepspeed`.

Gathers (all return the concatenation over ranks along dim 0):
- `all_gather_nograd`: values only, no autograd.
- `all_gather_with_grad`: autograd; backward sums every rank's gradient for this rank's
  slot (a reduce-scatter). Correct for any per-rank loss.
- `all_gather_replicated`: autograd; backward returns world_size x this rank's own slot
  gradient, with no communication. Exact only when every rank computes the same
  function of the gathered tensor (e.g. the global softmax loss): then all ranks hold the
  same slot gradient and the reduce-scatter above would sum W identical copies.
Both autograd gathers make `loss.backward()` + DDP/DeepSpeed gradient averaging give the
gradient of the global-batch loss.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from open_clip import loss as open_clip_loss

from vlp.core.hosts import slurm_hostnames

_ENV_SCHEMES = (
    # (name, rank, world size, local rank)
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as announced by its launcher."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Rank / world size / local rank from torchrun, DeepSpeed, accelerate, SLURM or OpenMPI variables."""
    env = os.environ if environ is None else environ
    for name, rank_key, size_key, local_key in _ENV_SCHEMES:
        if rank_key in env and size_key in env:
            return DistEnv(int(env[rank_key]), int(env[size_key]), int(env.get(local_key, 0)), name)
    return DistEnv()


def _set_rendezvous_defaults(env: DistEnv) -> None:
    """env:// rendezvous needs MASTER_ADDR/PORT; SLURM and MPI do not set them."""
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
        os.environ["MASTER_ADDR"] = slurm_hostnames(nodelist)[0] if nodelist else "127.0.0.1"
    os.environ.setdefault("MASTER_PORT", "29500")
    # DeepSpeed and accelerate read these even when another launcher started us.
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))


def pick_backend() -> str:
    """nccl with CUDA, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def use_cpu_accelerator_if_no_gpu() -> None:
    """Make DeepSpeed choose its CPU accelerator when there is no GPU; call before `import deepspeed`."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def use_this_environments_ninja() -> None:
    """Put this interpreter's bin folder first on PATH when DeepSpeed's ninja is installed there.

    DeepSpeed compiles its ops (CPU Adam, the shared-memory all-reduce) on first use with
    whichever `ninja` PATH finds. Ninja versions hash build commands differently, so a run
    started from an activated virtualenv (its ninja) and one started as `.venv/bin/vlp` (the
    system's ninja) each took the other's build as stale and recompiled it: about a minute of
    both cores per op, every time the two alternated.
    """
    bin_dir = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(bin_dir, "ninja")):
        path = os.environ.get("PATH", "")
        if path.split(os.pathsep)[0] != bin_dir:
            os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir


def prepare_for_deepspeed() -> None:
    """What must hold before `import deepspeed` and its first op build: its accelerator, and the ninja."""
    use_cpu_accelerator_if_no_gpu()
    use_this_environments_ninja()


def init_distributed(backend: str | None = None, timeout_s: float = 1800) -> DistEnv:
    """Join the process group the launcher set up (no-op for a single process).

    Sets the CUDA device to the local rank, and registers `destroy_distributed` at exit:
    without it a rare SIGABRT was seen at interpreter shutdown.
    """
    env = detect_env()
    if env.world_size > 1 and not dist.is_initialized():
        _set_rendezvous_defaults(env)
        backend = backend or pick_backend()
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        atexit.register(destroy_distributed)
    return env


def destroy_distributed() -> None:
    """Tear the process group down if there is one (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes ((0, 1) without a process group)."""
    return get_rank(), get_world_size()


def joined_hosts() -> str:
    """'world size N on M host(s): a x8, b x8': which machines joined (every rank calls it).

    Call once the device is set (after deepspeed.initialize): NCCL gathers on it.
    """
    name = socket.gethostname()
    names = [name]
    if is_distributed():
        names = [None] * get_world_size()
        dist.all_gather_object(names, name)
    counts = {h: names.count(h) for h in dict.fromkeys(names)}
    return (f"world size {len(names)} on {len(counts)} host(s): "
            + ", ".join(f"{h} x{n}" for h, n in counts.items()))


def find_free_port() -> int:
    """A TCP port free right now on localhost (for tests and single-node launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks along dim 0; no gradient flows."""
    if not is_distributed():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients every rank computed for this rank's slot."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.n = x.shape[0]
        return all_gather_nograd(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank = dist.get_rank()
        return grad[rank * ctx.n : (rank + 1) * ctx.n]


class _AllGatherReplicated(torch.autograd.Function):
    """all_gather for a loss every rank computes identically: backward = W x own slot, no comms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.n = x.shape[0]
        return all_gather_nograd(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        rank, world = dist.get_rank(), dist.get_world_size()
        return grad[rank * ctx.n : (rank + 1) * ctx.n] * world


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Gather along dim 0 with a gradient that is exact for any per-rank loss (one all-reduce in backward).

    Equal-sized local batches are assumed on every rank (the data loader guarantees it).
    """
    return _AllGatherWithGrad.apply(x) if is_distributed() else x


def all_gather_replicated(x: torch.Tensor) -> torch.Tensor:
    """Gather along dim 0 for a loss computed identically on all ranks; backward needs no communication."""
    return _AllGatherReplicated.apply(x) if is_distributed() else x


def neighbour_exchange_with_grad(from_rank: int, to_rank: int, x: torch.Tensor) -> torch.Tensor:
    """Send x to `to_rank`, receive from `from_rank`; gradients travel back (open_clip's primitive)."""
    return open_clip_loss.neighbour_exchange_with_grad(from_rank, to_rank, x)


def neighbour_exchange_bidir_with_grad(
    left: int, right: int, to_left: torch.Tensor, to_right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exchange with both neighbours at once; returns (from_right, from_left)."""
    return open_clip_loss.neighbour_exchange_bidir_with_grad(left, right, to_left, to_right)
