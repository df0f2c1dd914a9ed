"""Helper processes never outlive the process that started them, and a build's workers keep to a core each.

Builder workers, the synthetic-data pool and the training loader's workers
call `die_with_parent` first thing: if their parent dies, even by `kill -9`
(which runs no cleanup), the kernel sends them SIGKILL, so no orphan keeps
fetching, writing or holding memory.

A shard build's workers (local processes or Ray workers) call `take_core`: a worker's decoding threads
that move between cores spend more CPU per image than threads kept on one.
"""

from __future__ import annotations

import ctypes
import fcntl
import multiprocessing
import os
import signal
import tempfile
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(*_args: object) -> None:
    """Ask the kernel to kill this process when its parent dies (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: workers still exit when their queue breaks
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl took effect
        os._exit(1)


_CORE: list = []  # this process's core and the open lock file that holds it, once it took one


def take_core(offered: int | None) -> int | None:
    """Keep this process on a core of its own when its pool has one process per core it may use (`offered`:
    the pool's processes, or the CPUs a Ray node offers): the first core whose lock file (in the temp
    folder's vlp-cores) no other process holds; the advisory lock goes with the process. So two builds on one
    machine never pin two workers to one core: the second build's workers find the cores taken and stay where
    the kernel puts them, as do workers of a pool smaller than the cores. Returns the core, or None."""
    if _CORE:
        return _CORE[0][0]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else []
    if offered is None or len(cores) < 2 or offered != len(cores):
        return None
    folder = Path(tempfile.gettempdir()) / "vlp-cores"
    for core in cores:
        try:  # another user's folder, a full disk...: left to the kernel, as without pinning
            folder.mkdir(exist_ok=True)
            fh = open(folder / str(core), "a")  # noqa: SIM115 - held open: the lock lasts as long as the process
        except OSError:
            return None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process's core
            fh.close()
            continue
        os.sched_setaffinity(0, {core})
        _CORE.append((core, fh))
        return core
    return None
