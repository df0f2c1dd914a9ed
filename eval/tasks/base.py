"""What every task is: a suite entry (typed spec), a loader that reads a public format, a scorer.

A task's life in a run:

    task = TaskClass(spec, ctx)   spec validated by pydantic (extra keys forbidden)
    task.load()                   read the benchmark files; no model yet. An unusable
                                  file is a UserError; a bad item is a Skip
    task.inputs()                 the images and texts it needs -> FeatureStore.prefetch
    task.score(store)             metrics from cached features -> TaskResult

and, from the stored result alone (a report.json entry, no instance), its
section of report.html: `report_section` renders the part every task shares
and asks `report_figures`, which each task type overrides, for its plots.

Skipped items are never silent: each carries the item's id and a short
reason, the result counts them, and report.json lists them.
"""

from __future__ import annotations

import csv
import io
import json
import os
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import TypeAdapter
from vlp.eval import plots
from vlp.eval.features import FeatureStore
from vlp.eval.image_refs import ImageFailure, ImageRef
from vlp.eval.markup import esc, img, table
from vlp.eval.specs import SyntheticData, TaskSpec
from vlp.eval.synthetic import materialise

from vlp.core import storage
from vlp.core.errors import UserError
from vlp.core.fetch import FetchOptions
from vlp.core.smallfiles import read_small

MAX_LISTED_SKIPS = 1000  # report.json lists at most this many skipped items per task (all are counted)
SKIPS_IN_HTML = 20  # report.html lists the first ones; skipped.jsonl has every one
MAX_GROUP_BARS = 40  # groups in the default accuracy plot (the largest ones)


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
    """Base class: subclasses set `type` and `Spec`, implement load / inputs / score, and may override
    `report_figures` (the default plots accuracy per group when the result's details have groups)."""

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
        feats, failures = store.images(refs)
        ok = torch.ones(len(refs), dtype=torch.bool)
        for i, failure in failures.items():
            ok[i] = False
            self._skip_failure(ids[i], refs[i], failure)
        return feats, ok

    def _skip_failure(self, item_id: str, ref: ImageRef, failure: ImageFailure) -> None:
        self.skip(item_id, failure.reason, failure.detail or ref.describe())

    # ------------------------------------------------------------------ report.html, from report.json

    @classmethod
    def report_section(cls, name: str, result: dict[str, Any]) -> str:
        """This task's section of report.html from its report.json entry: heading, data source, counts,
        metrics table, skipped items, then the figures `report_figures` draws."""
        metrics = table(["metric", "value"], [[k, v] for k, v in result["metrics"].items()])
        ds = result["dataset"]
        where = ds.get("path") or (ds.get("materialised") or {}).get("path", "")
        source = f"{esc(ds.get('format'))}" + (f" <code>{esc(where)}</code>" if where else "")
        if ds.get("format") == "synthetic":
            written = esc((ds.get("materialised") or {}).get("path", ""))
            seed, n = esc(ds.get("seed")), esc(ds.get("n"))
            source += f" (seed {seed}, n {n}, written to <code>{written}</code>)"
        counts = f"{result['n_scored']} scored, {result['n_skipped']} skipped, {result['seconds']:.1f} s"
        figures = "".join(cls.report_figures(name, result))
        return (
            f'<h2 id="{esc(name)}">{esc(name)} <span class="muted">{esc(result["type"])}</span></h2>'
            f'<p class="muted">data: {source}<br>{counts}</p>{metrics}{_skips_html(result)}'
            f'<div class="plots">{figures}</div>'
        )

    @classmethod
    def report_figures(cls, name: str, result: dict[str, Any]) -> list[str]:
        """The section's figures as <img> elements. Default: accuracy per group (subset, relation,
        perturbation...) from details["groups"], the largest groups if there are many; none without groups."""
        details = result["details"]
        groups = details.get("groups") or {}
        if not groups:
            return []
        label = details.get("group_label", "group")
        chosen = sorted(sorted(groups, key=lambda g: -int(groups[g]["n"]))[:MAX_GROUP_BARS])
        counted = [g for g in chosen if groups[g].get("counted", True)]
        title = f"{name}: accuracy per {label}" + (
            f" (largest {MAX_GROUP_BARS} of {len(groups)})" if len(groups) > MAX_GROUP_BARS else ""
        )
        chance = details.get("group_chance", details.get("chance"))
        chart = plots.bars(counted, [groups[g]["acc"] for g in counted], title, chance=chance)
        return [img(chart, f"accuracy per {label}")]


def _skips_html(result: dict[str, Any]) -> str:
    """How many items were skipped and why, and the first few of them."""
    if not result["n_skipped"]:
        return ""
    reasons = table(["reason", "items"], [[r, n] for r, n in result["skip_reasons"].items()])
    listed = result["skipped"][:SKIPS_IN_HTML]
    rows = table(
        ["item", "reason", "detail"], [[s["id"], s["reason"], s["detail"]] for s in listed], numeric_from=9
    )
    more = result["n_skipped"] - len(listed)
    tail = f'<p class="muted">... and {more} more (skipped.jsonl lists every one)</p>' if more > 0 else ""
    return f'<p class="warn">Skipped {result["n_skipped"]} of {result["n_items"]} items.</p>{reasons}{rows}{tail}'


# ---------------------------------------------------------------------- file helpers shared by adapters


def read_text(path: Path, what: str) -> str:
    """A benchmark text file's contents, or a one-line UserError naming it."""
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        return read_small(path, f"{what} file").decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} file {path} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise UserError(f"{what} file {path} cannot be read ({err.strerror})") from None


def read_json(path: Path, what: str) -> Any:
    """Parse a benchmark JSON file, or a one-line UserError naming it."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{what} file {path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    except RecursionError:
        raise UserError(f"{what} file {path} is nested too deeply") from None


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty stripped lines of a text file (class names, templates, captions)."""
    return [line.strip() for line in read_text(path, what).splitlines() if line.strip()]


def read_csv(path: Path, what: str, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV/TSV benchmark file that has `columns`; missing cells read as ''."""
    reader = csv.DictReader(io.StringIO(read_text(path, what), newline=""), restval="",
                            delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        for col in columns:
            if col not in (reader.fieldnames or []):
                raise UserError(f"{what}: {path} has no column {col!r} (has {reader.fieldnames})")
        return [(reader.line_num, row) for row in reader]
    except csv.Error as err:
        raise UserError(f"{what}: {path} line {reader.line_num}: {err}") from None


def default_cache_dir() -> Path:
    """$VLP_CACHE_DIR, else $XDG_CACHE_HOME/vlp/eval, else ~/.cache/vlp/eval."""
    if os.environ.get("VLP_CACHE_DIR"):
        return Path(os.environ["VLP_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "vlp" / "eval"


def user_path(text: str) -> Path:
    """A path from the suite file: ~ and $VARS expanded, relative to the working directory.

    An object-storage URL (s3://bucket/prefix, a file or a whole prefix) is mirrored into the
    eval cache first (only objects whose ETag changed are fetched again): the readers then
    work on local files, with the random access they need.
    """
    text = os.path.expandvars(text)
    if storage.is_object_url(text):
        return storage.mirror(text, default_cache_dir() / "remote")
    return Path(text).expanduser().resolve()


def image_root(path: str, root: str | None, default: str = "") -> Path:
    """A task's image folder: `root` if given, else `default` (e.g. "images") beside the file at `path`."""
    if root:
        return user_path(root)
    if storage.is_object_url(path):
        parent = path.rstrip("/").rsplit("/", 1)[0]
        return user_path(f"{parent}/{default}" if default else parent)
    return user_path(path).parent / default


def require_keys(item: Any, keys: tuple[str, ...]) -> str | None:
    """The first of `keys` missing from a JSON item (or 'not an object'), else None."""
    if not isinstance(item, dict):
        return "not an object"
    for key in keys:
        if key not in item:
            return f"missing key {key!r}"
    return None
