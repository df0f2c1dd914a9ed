"""`vlp eval compare A/report.json B/report.json`: every metric side by side, with B - A.

Tasks are matched by name and metrics by key; a metric only one report has
shows a dash on the other side. The same rows go to the terminal and to
compare.html (with a chart of the main metrics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlp.eval import plots
from vlp.eval.markup import esc, fmt, img, page

from vlp.core.errors import UserError

Row = tuple[str, str, float | None, float | None, float | None]  # task, metric, a, b, b - a


def load_report(path: str | Path) -> dict[str, Any]:
    """A report.json (or a folder holding one), checked to be one."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise UserError(f"report not found: {path}")
    try:
        report = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{p} is not valid JSON") from None
    if not isinstance(report, dict) or "tasks" not in report or "schema_version" not in report:
        raise UserError(f"{p} is not a vlp eval report (no 'tasks' / 'schema_version')")
    return report


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def rows(a: dict[str, Any], b: dict[str, Any]) -> list[Row]:
    """(task, metric, A, B, B - A) for the union of tasks and metrics, in A's order then B's."""
    out: list[Row] = []
    names = list(dict.fromkeys([*a["tasks"], *b["tasks"]]))
    for name in names:
        ma = a["tasks"].get(name, {}).get("metrics", {})
        mb = b["tasks"].get(name, {}).get("metrics", {})
        for metric in dict.fromkeys([*ma, *mb]):
            va, vb = _number(ma.get(metric)), _number(mb.get(metric))
            out.append((name, metric, va, vb, None if va is None or vb is None else vb - va))
    return out


def _label(report: dict[str, Any], fallback: str) -> str:
    """The model as the user named it, plus its random-init seed (two untrained runs differ only there)."""
    model = report.get("model", {})
    label = str(model.get("source") or model.get("name") or fallback)
    return f"{label} (random, seed {model.get('seed')})" if model.get("random_init") else label


def text_table(data: list[Row], label_a: str, label_b: str) -> str:
    """A plain-text table for the terminal."""
    header = ("task", "metric", label_a[:32], label_b[:32], "delta")
    cells = [header] + [
        (t, m, fmt(va), fmt(vb), "–" if d is None else f"{d:+.4f}") for t, m, va, vb, d in data
    ]
    widths = [max(len(str(r[i])) for r in cells) for i in range(5)]
    lines = []
    for n, r in enumerate(cells):
        lines.append(
            "  ".join(
                str(c).ljust(w) if i < 2 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_compare(a: dict[str, Any], b: dict[str, Any], data: list[Row], label_a: str, label_b: str) -> str:
    """compare.html: the table with coloured deltas and a chart of each task's main metric."""
    body_rows = []
    for t, m, va, vb, d in data:
        cls = "" if d is None or abs(d) < 1e-12 else ("pos" if d > 0 else "neg")
        delta = "–" if d is None else f"{d:+.4f}"
        body_rows.append(
            f'<tr><td>{esc(t)}</td><td>{esc(m)}</td><td class="num">{fmt(va)}</td>'
            f'<td class="num">{fmt(vb)}</td><td class="num {cls}">{delta}</td></tr>'
        )
    head = "".join(
        f"<th>{esc(h)}</th>" for h in ("task", "metric", f"A: {label_a}", f"B: {label_b}", "B − A")
    )
    names = [n for n in dict.fromkeys([*a["tasks"], *b["tasks"]])]

    def main(report: dict[str, Any], name: str) -> float | None:
        task = report["tasks"].get(name)
        return _number(task["metrics"].get(task["main_metric"])) if task else None

    chart = plots.grouped_bars(
        names,
        {
            f"A: {label_a}"[:40]: [main(a, n) for n in names],
            f"B: {label_b}"[:40]: [main(b, n) for n in names],
        },
        "main metric per task",
        "value",
        ylim=None,
    )
    body = (
        f"<h1>Comparison</h1><p>A: <code>{esc(label_a)}</code> ({esc(a.get('created', ''))})<br>"
        f"B: <code>{esc(label_b)}</code> ({esc(b.get('created', ''))})</p>"
        f"{img(chart, 'main metrics')}<table><thead><tr>{head}</tr></thead><tbody>{''.join(body_rows)}</tbody></table>"
    )
    return page("vlp eval compare", body)


def compare(path_a: str, path_b: str, out: str | Path | None = None) -> tuple[str, Path]:
    """Print-ready table and the path of the compare.html written to `out` (default: the working directory)."""
    a, b = load_report(path_a), load_report(path_b)
    label_a, label_b = _label(a, path_a), _label(b, path_b)
    if label_a == label_b:
        label_a, label_b = str(path_a), str(path_b)
    data = rows(a, b)
    folder = Path(out) if out else Path.cwd()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "compare.html"
        target.write_text(render_compare(a, b, data, label_a, label_b), encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write compare.html to {folder}: {err.strerror}") from None
    return text_table(data, label_a, label_b), target
