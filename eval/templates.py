"""Prompt templates and zero-shot class embeddings (CLIP's prompt ensembling).

Templates hold the class name as `{c}` (CLIP_benchmark's convention, used in its
`zeroshot_classification_templates.txt`) or `{}`. `imagenet_templates.txt` is
the 80 prompts of the CLIP paper, as open_clip ships them.

A class embedding follows CLIP / CLIP_benchmark: format every template with the
class name, encode and L2-normalise each, average, renormalise.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from vlp.core.errors import UserError

TEMPLATE_DIR = Path(__file__).parent / "templates"
BUILTIN = {"imagenet": TEMPLATE_DIR / "imagenet_templates.txt"}


def check_template(template: str) -> str:
    """Return the template if it has exactly one class-name slot ({c} or {}), else raise ValueError."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(f"template {template!r}: {err}") from None
    if len(fields) != 1 or fields[0] not in ("c", ""):
        raise ValueError(
            f"template {template!r} must contain the class name slot exactly once, as {{c}} or {{}}"
        )
    return template


def format_template(template: str, classname: str) -> str:
    """'a photo of a {c}.' + 'dog' -> 'a photo of a dog.' (also '{}')."""
    return template.format(classname, c=classname)


def load_templates(source: str | Sequence[str]) -> list[str]:
    """Templates from a list, a built-in set name ('imagenet') or a text file (one per line)."""
    if isinstance(source, str):
        path = BUILTIN.get(source) or Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"templates: not a built-in set ({', '.join(BUILTIN)}) nor a file: {source}")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        lines = list(source)
    if not lines:
        raise UserError(f"templates: none given in {source!r}")
    try:
        return [check_template(t) for t in lines]
    except ValueError as err:
        raise UserError(f"templates: {err}") from None


def prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every class x template prompt, class-major (the order `class_embeddings` expects)."""
    return [format_template(t, c) for c in classnames for t in templates]


def class_embeddings(prompt_feats: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(dim, n_classes) classifier from normalised prompt features in `prompts` order."""
    per_class = prompt_feats.reshape(n_classes, -1, prompt_feats.shape[-1])
    mean = F.normalize(per_class, dim=-1).mean(dim=1)
    return F.normalize(mean, dim=-1).T
