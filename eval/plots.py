"""The report's figures, as base64 PNG strings ready for <img src="data:...">.

matplotlib's object API (Figure, no pyplot) so nothing touches global state
or needs a display, and the HTML carries its images inline: the page reads
offline, attached to an email or opened from a cluster's scratch disk.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

from matplotlib.figure import Figure

COLOURS = ("#3465a4", "#f57900", "#4e9a06", "#cc0000", "#75507b", "#c4a000")


def to_base64(fig: Figure) -> str:
    """PNG bytes of the figure, base64-encoded."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _tilt(labels: Sequence[object]) -> bool:
    """Slant tick labels when there are many or long ones, so they do not overprint."""
    return len(labels) > 4 or max((len(str(x)) for x in labels), default=0) > 10


def _value(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def bars(
    labels: Sequence[str],
    values: Sequence[float | None],
    title: str,
    ylabel: str = "accuracy",
    chance: float | None = None,
    ylim: tuple[float, float] | None = (0.0, 1.0),
) -> str:
    """One bar per label (per subset, relation, class...), value printed on top; a dashed chance line."""
    fig = Figure(figsize=(max(4.0, 0.45 * len(labels) + 1.5), 3.2))
    ax = fig.add_subplot()
    xs = range(len(labels))
    rects = ax.bar(xs, [_value(v) for v in values], color=COLOURS[0])
    ax.bar_label(rects, labels=["" if v is None else f"{v:.2f}" for v in values], fontsize=7, padding=1)
    tilt = _tilt(labels)
    ax.set_xticks(list(xs), labels, rotation=35 if tilt else 0, ha="right" if tilt else "center")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance {chance:.2f}")
        ax.legend(fontsize=8, loc="upper right")
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return to_base64(fig)


def grouped_bars(
    groups: Sequence[str],
    series: dict[str, Sequence[float | None]],
    title: str,
    ylabel: str = "",
    ylim: tuple[float, float] | None = (0.0, 1.0),
) -> str:
    """Bars per group, one colour per series (Winoground scores per tag; model A vs B in compare)."""
    fig = Figure(figsize=(max(4.5, 0.5 * len(groups) * len(series) + 1.5), 3.4))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [_value(v) for v in values], width=width, label=name, color=COLOURS[j % len(COLOURS)])
    tilt = _tilt(groups)
    ax.set_xticks(
        range(len(groups)),
        groups,
        rotation=35 if tilt else 0,
        ha="right" if tilt else "center",
    )
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return to_base64(fig)


def confusion(labels: Sequence[int | str], matrix: Sequence[Sequence[int]], title: str) -> str:
    """Counts heat map, rows = true, columns = predicted, each cell annotated."""
    n = len(labels)
    fig = Figure(figsize=(1.0 + 0.5 * n, 0.8 + 0.5 * n))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            if count:
                ax.text(
                    j,
                    i,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if count > top / 2 else "black",
                )
    ax.set_xticks(range(n), [str(x) for x in labels])
    ax.set_yticks(range(n), [str(x) for x in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return to_base64(fig)


def recall_curves(curves: dict[str, list], title: str) -> str:
    """Recall@k against k for both directions; QB-Norm curves dashed when present."""
    fig = Figure(figsize=(5.0, 3.4))
    ax = fig.add_subplot()
    ks = curves["k"]
    styles = {
        "image_retrieval": ("text → image", COLOURS[0], "-"),
        "text_retrieval": ("image → text", COLOURS[1], "-"),
        "image_retrieval_qbnorm": ("text → image, QB-Norm", COLOURS[0], "--"),
        "text_retrieval_qbnorm": ("image → text, QB-Norm", COLOURS[1], "--"),
    }
    for key, (label, colour, style) in styles.items():
        if key in curves:
            ax.plot(ks, [_value(v) for v in curves[key]], style, color=colour, label=label)
    ax.set_xscale("log")
    ticks = [k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500) if k <= ks[-1]]
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return to_base64(fig)
