"""report.html from report.json's content: tables and inline plots, no external assets.

The HTML is a pure function of the report dict, so a report can be
re-rendered from its JSON alone (`render_report(json.load(...))`).
"""

from __future__ import annotations

import html
from typing import Any

from eval import plots

STYLE = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1150px;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 2em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #777; font-size: 0.9em; } .warn { color: #a40000; }
.pos { color: #2e7d32; } .neg { color: #c62828; }
.plots img { max-width: 100%; margin: 4px 12px 4px 0; vertical-align: top; border: 1px solid #eee; }
code { background: #f5f5f5; padding: 1px 4px; border-radius: 3px; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """Numbers as the JSON has them, to 4 decimals; None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return esc(value)


def table(headers: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
    """An HTML table; columns from `numeric_from` on are right-aligned numbers."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{fmt(c)}</td>' if i >= numeric_from else f"<td>{fmt(c)}</td>"
            for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def img(b64: str, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{b64}">'


def page(title: str, body: str) -> str:
    """A complete HTML document with inline CSS."""
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
    )


# ---------------------------------------------------------------------- per task type


def _group_plot(name: str, task: dict[str, Any], max_groups: int = 40) -> list[str]:
    """Per-subset / per-relation / per-perturbation accuracy bars (the biggest groups if there are many)."""
    groups = task["details"].get("groups") or {}
    if not groups:
        return []
    label = task["details"].get("group_label", "group")
    if task["type"] == "winoground":
        tags = list(groups)
        series = {k: [groups[t].get(f"{k}_score") for t in tags] for k in ("text", "image", "group")}
        overall = task["metrics"]
        chart = plots.bars(
            ["text", "image", "group"],
            [overall.get("text_score"), overall.get("image_score"), overall.get("group_score")],
            f"{name}: Winoground scores",
            chance=1 / 6,
        )
        return [
            img(chart, "scores"),
            img(plots.grouped_bars(tags, series, f"{name}: scores per {label}", "score"), "per tag"),
        ]
    chosen = sorted(groups, key=lambda g: -int(groups[g]["n"]))[:max_groups]
    chosen = sorted(chosen)
    counted = [g for g in chosen if groups[g].get("counted", True)]
    title = f"{name}: accuracy per {label}" + (
        f" (largest {max_groups} of {len(groups)})" if len(groups) > max_groups else ""
    )
    chance = task["details"].get("group_chance", task["details"].get("chance"))
    chart = plots.bars(counted, [groups[g]["acc"] for g in counted], title, chance=chance)
    return [img(chart, f"accuracy per {label}")]


def _plots(name: str, task: dict[str, Any]) -> list[str]:
    details, kind = task["details"], task["type"]
    out: list[str] = []
    if kind == "zeroshot_classification" and details.get("per_class_recall"):
        rec = details["per_class_recall"]
        if len(rec) <= 60:
            chart = plots.bars(
                list(rec), list(rec.values()), f"{name}: recall per class", "recall", details.get("chance")
            )
            out.append(img(chart, "recall per class"))
    elif kind == "retrieval" and details.get("recall_curve", {}).get("k"):
        out.append(img(plots.recall_curves(details["recall_curve"], f"{name}: recall@k"), "recall@k curves"))
    elif kind == "counting" and details.get("confusion_matrix"):
        cm = details["confusion_matrix"]
        out.append(
            img(
                plots.confusion(cm["labels"], cm["matrix"], f"{name}: counting confusion matrix"),
                "confusion matrix",
            )
        )
        per = details.get("per_number_acc", {})
        out.append(
            img(
                plots.bars(
                    list(per),
                    list(per.values()),
                    f"{name}: accuracy per true count",
                    chance=details.get("chance"),
                ),
                "per number",
            )
        )
    else:
        out += _group_plot(name, task)
    return out


def _skips(task: dict[str, Any]) -> str:
    if not task["n_skipped"]:
        return ""
    reasons = table(["reason", "items"], [[r, n] for r, n in task["skip_reasons"].items()])
    listed = task["skipped"][:20]
    rows = table(
        ["item", "reason", "detail"], [[s["id"], s["reason"], s["detail"]] for s in listed], numeric_from=9
    )
    more = task["n_skipped"] - len(listed)
    tail = f'<p class="muted">... and {more} more (skipped.jsonl lists every one)</p>' if more > 0 else ""
    return f'<p class="warn">Skipped {task["n_skipped"]} of {task["n_items"]} items.</p>{reasons}{rows}{tail}'


def _task_section(name: str, task: dict[str, Any]) -> str:
    metrics = table(["metric", "value"], [[k, v] for k, v in task["metrics"].items()])
    ds = task["dataset"]
    where = ds.get("path") or (ds.get("materialised") or {}).get("path", "")
    source = f"{esc(ds.get('format'))}" + (f" <code>{esc(where)}</code>" if where else "")
    if ds.get("format") == "synthetic":
        source += f" (seed {esc(ds.get('seed'))}, n {esc(ds.get('n'))}, written to <code>{esc((ds.get('materialised') or {}).get('path', ''))}</code>)"
    counts = f"{task['n_scored']} scored, {task['n_skipped']} skipped, {task['seconds']:.1f} s"
    figures = "".join(_plots(name, task))
    return (
        f'<h2 id="{esc(name)}">{esc(name)} <span class="muted">{esc(task["type"])}</span></h2>'
        f'<p class="muted">data: {source}<br>{counts}</p>{metrics}{_skips(task)}<div class="plots">{figures}</div>'
    )


def _summary(report: dict[str, Any]) -> str:
    rows = []
    for name, task in report["tasks"].items():
        rows.append(
            [
                f'<a href="#{esc(name)}">{esc(name)}</a>',
                task["type"],
                task["main_metric"],
                task["metrics"].get(task["main_metric"]),
                task["details"].get("chance"),
                task["n_scored"],
                task["n_skipped"],
            ]
        )
    head = "".join(
        f"<th>{h}</th>" for h in ("task", "type", "metric", "value", "chance", "scored", "skipped")
    )
    body = "".join(
        f"<tr><td>{r[0]}</td><td>{esc(r[1])}</td><td>{esc(r[2])}</td>"
        + "".join(f'<td class="num">{fmt(c)}</td>' for c in r[3:])
        + "</tr>"
        for r in rows
    )
    names = list(report["tasks"])
    values = [report["tasks"][n]["metrics"].get(report["tasks"][n]["main_metric"]) for n in names]
    chart = plots.bars(
        names, values, "main metric per task", "value", ylim=(0.0, max([1.0] + [v for v in values if v]))
    )
    return f"<h2>Summary</h2><table><tr>{head}</tr>{body}</table>{img(chart, 'summary')}"


def render_report(report: dict[str, Any]) -> str:
    """The whole report page."""
    model, run, suite = report["model"], report["run"], report["suite"]
    enc = run["encoding"]
    weights = f"random init (seed {model.get('seed')})" if model.get("random_init") else model.get("weights")
    meta = table(
        ["", ""],
        [
            [
                "model",
                f"{model['name']} ({model['parameters']:,} parameters, embed dim {model['embed_dim']})",
            ],
            ["weights", weights],
            ["suite", f"{suite['name']} ({suite['path']})"],
            ["device", f"{run['device']}, {run['precision']}, {run['world_size']} process(es)"],
            ["created", report["created"]],
            ["time", f"{run['seconds']:.1f} s in all, {enc['seconds']:.1f} s encoding"],
            [
                "encoded",
                f"{enc['images_encoded']} images ({enc['images_failed']} failed, {enc['image_cache_hits']} cache hits), "
                f"{enc['texts_encoded']} texts ({enc['text_cache_hits']} cache hits)",
            ],
        ],
        numeric_from=9,
    )
    desc = f"<p>{esc(suite['description'])}</p>" if suite.get("description") else ""
    sections = "".join(_task_section(name, task) for name, task in report["tasks"].items())
    body = f"<h1>Evaluation report: {esc(model['name'])}</h1>{desc}{meta}{_summary(report)}{sections}"
    return page(f"vlp eval: {model['name']} on {suite['name']}", body)
