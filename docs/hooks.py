"""MkDocs hooks: the pages that are generated, so they cannot drift from what they describe.

- index.md: the README (the repository's front door is the site's home page);
- reference.md: every key of every command, from the pydantic schemas in vlp.core.config
  (the same rows `vlp config show NAME --describe` prints);
- results.md: every benchmark's figures, from bench/results/*.json (each with its date,
  commit, machine and command), plus the plots those files name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def on_files(files, config):
    pages = (("index.md", index_page()), ("reference.md", reference_page()), ("results.md", results_page()),
             ("coming-from-open-clip.md", open_clip_page()))
    for name, text in pages:
        files.append(File.generated(config, name, content=text))
    for plot in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{plot.name}", abs_src_path=str(plot)))
    return files


def index_page() -> str:
    """The README, its links made relative to the site (docs/x.md -> x.md; other repository files as code)."""
    text = (ROOT / "README.md").read_text()
    text = re.sub(r"\]\(docs/([^)]+)\)", r"](\1)", text)
    # a link to a repository file that is not a page: its text, and the path as code
    return re.sub(r"\[([^\]]+)\]\((?!https?://)([^)#]+)\)",
                  lambda m: m.group(0) if m.group(2).endswith(".md") else f"{m.group(1)} (`{m.group(2)}`)", text)


def reference_page() -> str:
    from vlp.app.flags import describe
    from vlp.core.config import COMMAND_SCHEMAS

    out = ["# Configuration reference", "",
           "Every key of every command, generated from the schemas in `vlp/core/config.py` when this site is "
           "built (`vlp config show NAME --describe` prints the same). Keys of `vlp train` are dotted "
           "(`optim.lr=5e-4` on the command line, or nested in a YAML file); the other commands take the same "
           "names as flags (`--image-size 256`) or as `key=value`.", ""]
    for name, schema in COMMAND_SCHEMAS.items():
        out += [f"## `{name}`", "", (schema.__doc__ or "").strip().split("\n")[0], "",
                "| key | type | default | what |", "|---|---|---|---|"]
        for key, kind, default, text in describe(schema):
            cell = str(text).replace("|", "\\|")
            out.append(f"| `{key}` | {kind} | `{default}` | {cell} |")
        out.append("")
    return "\n".join(out)


def open_clip_page() -> str:
    from vlp.app.foreign_flags import FLAGS, IMG2DATASET, mapping_table

    return "\n".join([
        "# Coming from open_clip_train and img2dataset", "",
        "`vlp train` takes open_clip_train's flags, and `vlp shards build` img2dataset's, as their users type "
        "them: each one with a vlp counterpart becomes that key's override, and the command prints which "
        "(`vlp: --lr is open_clip_train's flag: optim.lr=0.001`); one without stops with a line saying what to "
        "use instead. The tables below are generated from the ones the commands use "
        "(`vlp/app/foreign_flags.py`).", "",
        "## open_clip_train -> `vlp train`", "",
        "`configs/open_clip_train.yaml` sets open_clip_train's defaults; where plain vlp differs, and why, "
        "is on the [parity page](parity.md). vlp's keys are dotted (`optim.lr=5e-4`), a list item by its "
        "index (`data.sources.0.shards=...`), and `vlp config show train --describe` lists them all.", "",
        mapping_table(FLAGS, "open_clip_train"), "",
        "## img2dataset -> `vlp shards build`", "",
        "vlp's shards are img2dataset's webdataset layout (`NNNNN.tar`, `.parquet`, `_stats.json` with its "
        "`successes`, `failed_to_download`, `failed_to_resize` and `config`); a folder of parquet, CSV or "
        "JSONL files is read as img2dataset's url list folder.", "",
        mapping_table(IMG2DATASET, "img2dataset"), ""])


def results_page() -> str:
    out = ["# Results", "",
           "Generated from the result files in `bench/results/` when this site is built: each bench script "
           "writes one (`--json`), with the figures, the date, the commit, the machine and the command that "
           "made them. Nothing here is typed by hand.", ""]
    for path in sorted(RESULTS.glob("*.json"), key=_order):
        result = json.loads(path.read_text())
        out += [f"## {result.get('title', path.stem)}", "",
                f"`{result['command']}` — {result['date']}, commit `{result['commit']}`, {result['machine']}"
                + (f"; {result['conditions']}" if result.get("conditions") else "") + ".", ""]
        if result.get("about"):
            out += [result["about"], ""]
        for table in result.get("tables", []):
            if table.get("title"):
                out += [f"**{table['title']}**", ""]
            out += ["| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
            out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table["rows"]]
            out.append("")
        for plot in result.get("plots", []):
            out += [f"![{plot}](results/{plot})", ""]
        if result.get("notes"):
            out += [result["notes"], ""]
    return "\n".join(out)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.2f}".rstrip("0").rstrip(".")
    return str(value).replace("|", "\\|")


def _order(path: Path) -> tuple:
    return (json.loads(path.read_text()).get("order", 50), path.stem)
