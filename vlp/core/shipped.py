"""The files vlp ships beside its code: presets (`configs/`) and launch files (`launch/`).

In a checkout they are the repository's `configs/` and `launch/` folders; installed
from a wheel they are package data (`vlp.configs`, `vlp.launch`), so every documented
command works the same from either. One rule resolves a path to such a file,
wherever one is taken (`--config`, `train.deepspeed_config`, accelerate's DeepSpeed
file, the launch commands):

- a path that exists is used as given, so a user's edited copy wins
  (`vlp launch init DIR` writes `DIR/configs/` and `DIR/launch/`);
- otherwise `configs/NAME` or `launch/NAME` (or a preset's bare name, `--config demo`)
  means the shipped copy.
"""

from __future__ import annotations

import re
import shutil
from importlib.resources import files
from pathlib import Path

from vlp.core.confine import inside
from vlp.core.errors import UserError

PRESET_NAME = re.compile(r"^[\w-]+(\.yaml)?$")
FOLDERS = {"configs": "vlp.configs", "launch": "vlp.launch"}  # folder name -> package holding it


def shipped_dir(folder: str) -> Path:
    """The shipped `configs/` or `launch/` folder (a real directory: vlp is never installed zipped)."""
    return Path(str(files(FOLDERS[folder])))


def shipped_files(folder: str) -> list[Path]:
    return sorted(p for p in shipped_dir(folder).iterdir()
                  if p.is_file() and p.name != "__init__.py" and not p.name.endswith(".pyc"))


def resolve(path: str | Path) -> str:
    """`path` if it exists, else the shipped file it names, else `path` (for the caller's error)."""
    path = str(path)
    if Path(path).exists():
        return path
    folder, _, name = Path(path).as_posix().partition("/")
    if not name and PRESET_NAME.match(folder):  # a preset's bare name: 'demo' or 'demo.yaml'
        folder, name = "configs", folder if folder.endswith(".yaml") else f"{folder}.yaml"
    if folder in FOLDERS and name and "/" not in name:
        candidate = shipped_dir(folder) / name
        if candidate.is_file():
            return str(candidate)
    return path


def write_copies(dest: str | Path) -> list[Path]:
    """`dest/configs/*` and `dest/launch/*`: editable copies of the shipped files (never overwrites)."""
    dest = Path(dest)
    # inside(): a name (or a folder on its way) that is a link out of dest is refused, even a dangling one,
    # which exists() does not see and a copy would follow
    pairs = [(src, inside(dest, f"{folder}/{src.name}", "vlp launch init: file"))
             for folder in FOLDERS for src in shipped_files(folder)]
    existing = [str(target) for _, target in pairs if target.exists() or target.is_symlink()]
    if existing:
        raise UserError(f"{existing[0]} exists; vlp launch init never overwrites (choose an empty folder)")
    for src, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)  # copy2 keeps slurm.sbatch / torchrun_node.sh executable
    return [target for _, target in pairs]
