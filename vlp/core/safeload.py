"""Loading never executes code: the one way vlp reads a file written with torch.save.

A pickle can name any Python callable, and `torch.load(..., weights_only=False)`
calls it: a crafted checkpoint file would run its payload on resume. Every
pickle vlp reads (its RNG states, and DeepSpeed's model and optimizer files,
whose loader vlp replaces on the engine) goes through `safe_torch_load`:
`torch.load(weights_only=True)` - tensors, containers and numbers only - plus
an explicit allowlist of the few plain data types DeepSpeed stores in its
optimizer files. Anything else is refused with a one-line error naming the
file, before any of it is built.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from vlp.core.errors import UserError, first_line


class UnsafeFileError(UserError):
    """A file that would need arbitrary code to load."""


def safe_torch_load(path: str | Path, map_location: Any = "cpu", allowed: list | tuple = ()) -> Any:
    """`torch.load` with `weights_only=True` and only the `allowed` extra types; UnsafeFileError otherwise."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = (str(err).strip().splitlines() or [""])[0]
        detail = next((line.strip() for line in str(err).splitlines() if "Unsupported" in line), first)
        raise UnsafeFileError(
            f"{path}: refused to load: it holds Python objects other than tensors and checkpoint data ({detail})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # truncated or not a torch file
        first = first_line(err)
        raise UserError(f"{path}: not a readable checkpoint file ({first})") from None
