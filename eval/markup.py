"""HTML building blocks shared by report.html (eval.report, each task's section) and compare.html.

Plain strings, inline CSS, images as data: URLs: a page needs no other file.
"""

from __future__ import annotations

import html
from typing import Any

STYLE = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1150px;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 2em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; }
th { background: #f3f3f3; cursor: pointer; } th[aria-sort]::after { content: " \\2195"; color: #999; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
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
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def img(b64: str, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{b64}">'


# Click a column's header to sort its table by it (numbers as numbers), again to reverse: inline, so the
# page stays one file that works offline.
SORT = """
document.querySelectorAll("table").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th, col) {
    th.setAttribute("aria-sort", "none");
    th.addEventListener("click", function () {
      var up = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("thead th").forEach(function (h) { h.setAttribute("aria-sort", "none"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var key = function (row) { var t = row.cells[col].textContent, n = parseFloat(t); return isNaN(n) ? t : n; };
      rows.sort(function (a, b) {
        var x = key(a), y = key(b), c = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
        return up ? c : -c;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def page(title: str, body: str) -> str:
    """A complete HTML document with inline CSS and the inline table-sorting script."""
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head><body>{body}<script>{SORT}</script></body></html>\n"
    )
