"""report.html from report.json's content: tables and inline plots, no external assets.

The HTML is a pure function of the report dict, so a report can be
re-rendered from its JSON alone (`render_report(json.load(...))`). The page
frame and the summary are drawn here; each task's section by its task class
(`Task.report_section`, looked up in `TASKS` by the stored `type`).
"""

from __future__ import annotations

from typing import Any

from vlp.eval import plots
from vlp.eval.markup import esc, fmt, img, page, table
from vlp.eval.tasks import TASKS
from vlp.eval.tasks.base import Task


def _task_section(name: str, task: dict[str, Any]) -> str:
    """The section its task type renders (the generic one for a type this version does not know)."""
    return TASKS.get(task["type"], Task).report_section(name, task)


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
    return f"<h2>Summary</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{img(chart, 'summary')}"


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
