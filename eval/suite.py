"""Suite files: which tasks to run on which data, validated before any model is loaded.

A suite is YAML:

    name: default
    description: what it measures
    tasks:
      - name: shapes            # unique; names the report section
        type: zeroshot_classification
        dataset: {format: synthetic, attribute: shape, n: 40}
        templates: ["a {c}.", "a photo of a {c}."]
      - name: coco
        type: retrieval
        dataset: {format: karpathy, path: data/coco/dataset_coco.json, image_root: data/coco}

Each task type's keys are the pydantic spec in its module (eval/tasks/*);
unknown keys are errors. Paths are relative to the working directory, with
~ and $VARS expanded. Any problem is one line naming the task and the key,
raised as `UserError` (the CLI prints it and exits 2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from vlp.eval.tasks import TASKS
from vlp.eval.tasks.base import TaskSpec

from vlp.core import storage
from vlp.core.errors import UserError
from vlp.core.smallfiles import read_small

SUITE_DIR = Path(__file__).parent / "suites"


class SuiteHeader(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = "suite"
    description: str = ""
    tasks: list[Any]


@dataclass
class Suite:
    """A validated suite: its header and one typed spec per task."""

    name: str
    description: str
    path: str
    tasks: list[TaskSpec]


def _child(node: Any, part: Any) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return node[part]
    return None


def _where(loc: tuple, data: Any) -> str:
    """A dotted key path for a pydantic error location, leaving out the union tags pydantic inserts."""
    parts: list[str] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part not in node and part == node.get("format"):
            continue  # the discriminated union's tag, not a key the user wrote
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}" if parts else str(part))
        node = _child(node, part)
    return "".join(parts) or "<top level>"


def _one_line(err: ValidationError, data: Any) -> str:
    first = err.errors()[0]
    where = _where(tuple(first["loc"]), data)
    more = len(err.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if first["type"] == "extra_forbidden":
        return f"unknown key '{where}'{tail}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"key '{where}': {msg}{tail}"


def _task_label(i: int, raw: Any) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"tasks[{i}]" + (f" ({name})" if isinstance(name, str) else "")


def parse_suite(data: Any, source: str) -> Suite:
    """Validate a loaded YAML document; UserError on the first problem."""
    if not isinstance(data, dict):
        raise UserError(f"suite {source}: the top level must be a mapping with a 'tasks' list")
    try:
        header = SuiteHeader.model_validate(data)
    except ValidationError as err:
        raise UserError(f"suite {source}: {_one_line(err, data)}") from None
    if not header.tasks:
        raise UserError(f"suite {source}: 'tasks' is empty")
    specs: list[TaskSpec] = []
    for i, raw in enumerate(header.tasks):
        label = _task_label(i, raw)
        if not isinstance(raw, dict):
            raise UserError(f"suite {source}: {label} must be a mapping with 'name', 'type' and 'dataset'")
        kind = raw.get("type")
        if not isinstance(kind, str) or kind not in TASKS:
            known = ", ".join(TASKS)
            shown = "no 'type'" if kind is None else f"unknown task type {kind!r}"
            raise UserError(f"suite {source}: {label}: {shown} (known: {known})")
        try:
            specs.append(TASKS[kind].Spec.model_validate(raw))
        except ValidationError as err:
            raise UserError(f"suite {source}: {label}: {_one_line(err, raw)}") from None
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise UserError(f"suite {source}: task name {spec.name!r} is used twice")
        seen.add(spec.name)
    return Suite(name=header.name, description=header.description, path=source, tasks=specs)


def find_suite(name_or_path: str) -> Path:
    """A suite file path, or the name of a shipped suite ('default' -> eval/suites/default.yaml)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = SUITE_DIR / f"{name_or_path}.yaml"
    if "/" not in name_or_path and shipped.is_file():
        return shipped
    raise UserError(f"suite file not found: {name_or_path}")


def load_suite(name_or_path: str, only: list[str] | None = None) -> Suite:
    """Read and validate a suite file; `only` keeps the named tasks (an unknown name is an error)."""
    path = find_suite(name_or_path)
    try:
        data = yaml.safe_load(read_small(path, "suite", 16 << 20).decode("utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"suite {path}{where}: not valid YAML") from None
    except UnicodeDecodeError:
        raise UserError(f"suite {path}: not UTF-8 text") from None
    suite = parse_suite(data, str(path))
    if only:
        names = [t.name for t in suite.tasks]
        unknown = [n for n in only if n not in names]
        if unknown:
            raise UserError(f"--only: no task {unknown[0]!r} in suite {path} (tasks: {', '.join(names)})")
        suite.tasks = [t for t in suite.tasks if t.name in only]
    return suite


def check_files(suite: Suite) -> Suite:
    """Every file and folder the suite's tasks name exists (an object-storage URL: the object or prefix):
    for a run that evaluates at its end, or every N steps, a typo fails before the work, not after it."""
    for task in suite.tasks:
        data = getattr(task, "dataset", None)
        for field in ("path", "image_root"):
            value = getattr(data, field, None)
            if value and not _exists(value):
                raise UserError(f"suite {suite.path}, task {task.name}: dataset.{field} {value}: no such file "
                                "or folder")
    return suite


def _exists(text: str) -> bool:
    text = os.path.expandvars(text)
    if storage.is_object_url(text):
        return storage.exists(text) or bool(storage.names(text))
    return Path(text).expanduser().exists()
