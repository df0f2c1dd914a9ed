"""Host names of a SLURM allocation, as SLURM itself expands them (no torch import: `vlp launch` uses it)."""

from __future__ import annotations

import subprocess

from vlp.core.errors import UserError


def slurm_hostnames(nodelist: str) -> list[str]:
    """SLURM's own expansion of a node list (`scontrol show hostnames`), in order.

    'rack1-[1-2]n[01-04]' is eight hosts; a pattern of our own would get such lists
    wrong, so the one program that defines the syntax expands it.
    """
    try:
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        raise UserError(f"SLURM_JOB_NODELIST is set but scontrol cannot run ({err}); set MASTER_ADDR") from None
    hosts = done.stdout.split()
    if done.returncode != 0 or not hosts:
        why = (done.stderr.strip().splitlines() or ["no hosts"])[-1]
        raise UserError(f"scontrol show hostnames {nodelist!r} failed ({why}); set MASTER_ADDR")
    return hosts
