"""What every task is: a suite entry (typed spec), a loader that reads a public format, a scorer.

A task's life in a run:

    task = TaskClass(spec, ctx)   spec validated by pydantic (extra keys forbidden)
    task.load()                   read the benchmark files; no model yet. An unusable
                                  file is a UserError; a bad item is a Skip
    task.inputs()                 the images and texts it needs -> FeatureStore.prefetch
    task.score(store)             metrics from cached features -> TaskResult

Skipped items are never silent: each carries the item's id and a short
reason, the result counts them, and report.json lists them.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from data_tools.fetch import FetchOptions
from eval.features import FeatureStore
from eval.images import ImageFailure, ImageRef
from vlp.errors import UserError

# Training data uses small seeds (0, 1, ...); evaluation sets use this one, so no
# synthetic eval image can coincide with a training image of the default runs.
SYNTH_SEED = 10_000_019
MAX_LISTED_SKIPS = 1000  # report.json lists at most this many skipped items per task (all are counted)


class Spec(BaseModel):
    """Suite YAML sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class SyntheticData(Spec):
    """Generate the benchmark from data_tools.synth into the public format, cached by these parameters."""

    format: Literal["synthetic"]
    n: int = Field(gt=0, description="items (per class for zero-shot, per number for counting)")
    seed: int = SYNTH_SEED
    image_size: int = Field(64, ge=16, le=1024)


class TaskSpec(Spec):
    name: str = Field(
        pattern=r"^[A-Za-z0-9_.\-]+$", description="unique within the suite; names the report section"
    )
    type: str


@dataclass(frozen=True)
class Skip:
    """An item not scored, with its id and why."""

    id: str
    reason: str
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "reason": self.reason, "detail": self.detail}


@dataclass
class TaskResult:
    """What a task reports: metrics (flat name -> number), counts, skips, and data for plots."""

    metrics: dict[str, float | None]
    main_metric: str
    n_scored: int
    skipped: list[Skip]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        """Every item is either scored or skipped (once, whatever number of its images failed)."""
        return self.n_scored + len(self.skipped)

    def as_dict(self) -> dict[str, Any]:
        reasons = Counter(s.reason for s in self.skipped)
        return {
            "metrics": self.metrics,
            "main_metric": self.main_metric,
            "n_items": self.n_items,
            "n_scored": self.n_scored,
            "n_skipped": len(self.skipped),
            "skip_reasons": dict(sorted(reasons.items())),
            "skipped": [s.as_dict() for s in self.skipped[:MAX_LISTED_SKIPS]],
            "details": self.details,
        }


@dataclass(frozen=True)
class Context:
    """What tasks need from the run besides their spec."""

    cache_dir: Path  # synthetic sets are written here


class Task(ABC):
    """Base class: subclasses set `type` and `Spec`, and implement load / inputs / score."""

    type: ClassVar[str]
    Spec: ClassVar[type[TaskSpec]]

    def __init__(self, spec: TaskSpec, ctx: Context):
        self.spec = spec
        self.ctx = ctx
        self._skips: dict[str, Skip] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    @abstractmethod
    def load(self) -> None:
        """Read the benchmark files (no model): UserError if unusable, Skip per bad item."""

    @abstractmethod
    def inputs(self) -> tuple[list[ImageRef], list[str]]:
        """Every image and text `score` will ask the store for."""

    @abstractmethod
    def score(self, store: FeatureStore) -> TaskResult:
        """Metrics from the prefetched features."""

    def dataset(self, adapter: TypeAdapter) -> Any:
        """The spec's dataset in its public format: a synthetic one is written (or found in the cache) first,
        so every task reads synthetic and downloaded sets through the same adapter."""
        data = self.spec.dataset  # type: ignore[attr-defined]
        if not isinstance(data, SyntheticData):
            return data
        from eval.synthetic import materialise

        self.materialised = materialise(self.type, data, self.ctx.cache_dir)
        return adapter.validate_python(self.materialised)

    def fetch_options(self) -> FetchOptions | None:
        """How to fetch remote images (None: the default 10 s timeout, one retry)."""
        return None

    def describe_dataset(self) -> dict[str, Any]:
        """The dataset part of the spec, for the report (with where a synthetic set was written)."""
        out = self.spec.dataset.model_dump(mode="json")  # type: ignore[attr-defined]
        if getattr(self, "materialised", None):
            out["materialised"] = self.materialised
        return out

    @property
    def skipped(self) -> list[Skip]:
        """Skipped items in the order first skipped."""
        return list(self._skips.values())

    def skip(self, item_id: Any, reason: str, detail: str = "") -> None:
        """Record that an item is not scored; a second reason for the same item joins the first's detail."""
        key = str(item_id)
        if key in self._skips:
            first = self._skips[key]
            self._skips[key] = Skip(key, first.reason, "; ".join(x for x in (first.detail, detail) if x))
        else:
            self._skips[key] = Skip(key, reason, detail)

    def is_skipped(self, item_id: Any) -> bool:
        return str(item_id) in self._skips

    def image_features(self, store: FeatureStore, refs: list[ImageRef], ids: list[str]):
        """Features for refs; a failed image becomes a Skip of its item (by id). Returns (feats, ok mask)."""
        import torch

        feats, failures = store.images(refs)
        ok = torch.ones(len(refs), dtype=torch.bool)
        for i, failure in failures.items():
            ok[i] = False
            self._skip_failure(ids[i], refs[i], failure)
        return feats, ok

    def _skip_failure(self, item_id: str, ref: ImageRef, failure: ImageFailure) -> None:
        self.skip(item_id, failure.reason, failure.detail or ref.describe())


# ---------------------------------------------------------------------- file helpers shared by adapters


def read_json(path: Path, what: str) -> Any:
    """Parse a benchmark JSON file, or a one-line UserError naming it."""
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{what} file {path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} file {path} is not UTF-8 text") from None


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty stripped lines of a text file (class names, templates, captions)."""
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def user_path(text: str) -> Path:
    """A path from the suite file: ~ and $VARS expanded, relative to the working directory."""
    import os

    return Path(os.path.expandvars(text)).expanduser().resolve()


def require_keys(item: Any, keys: tuple[str, ...]) -> str | None:
    """The first of `keys` missing from a JSON item (or 'not an object'), else None."""
    if not isinstance(item, dict):
        return "not an object"
    for key in keys:
        if key not in item:
            return f"missing key {key!r}"
    return None
