"""Helper processes never outlive the process that started them.

Builder workers, the synthetic-data pool and the training loader's workers
call `die_with_parent` first thing: if their parent dies, even by `kill -9`
(which runs no cleanup), the kernel sends them SIGKILL, so no orphan keeps
fetching, writing or holding memory.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal

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
