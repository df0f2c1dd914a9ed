"""Hubness normalisations, measured: retrieval R@1 plain, with QB-Norm and with both DBNorm variants.

    python bench/hubness.py --demo runs/demo [--real-model RUN --real openmoji] [--work /tmp/vlp-bench-hubness]

- demo: the default suite's retrieval task (synthetic, 500 images, 1,000 captions) with the
  demo's model; the banks are 1,000 other synthetic pairs (the generator with another seed:
  training-like data, never the evaluated set);
- real: a set of bench/real_sets.py (its "style" retrieval task: drawings in a style never
  trained on) with a model trained on the set's pairs (bench/curation.py --real trains one);
  the banks are that set's training pairs, as the DBNorm paper builds its banks.
QB-Norm uses the same bank files (its query bank), never the evaluated queries.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from baselines import markdown, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = [("none", ""), ("QB-Norm", "_qbnorm"), ("DBNorm", "_dbnorm"), ("DBNorm dynamic", "_dbnorm_dynamic")]


def _banks(folder: Path, pairs: list[tuple[str, str]]) -> dict:
    """texts.txt and images.txt for the bank files (image paths absolute)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "texts.txt").write_text("".join(c.replace("\n", " ") + "\n" for _, c in pairs))
    (folder / "images.txt").write_text("".join(str(Path(p).resolve()) + "\n" for p, _ in pairs))
    return {"texts": str(folder / "texts.txt"), "images": str(folder / "images.txt")}


def _evaluate(model: str, task: dict, banks: dict, out: Path) -> dict:
    task = {**task, "qb_norm": {"beta": 20, "k": 1, "querybank": banks}, "db_norm": {"banks": banks}}
    suite = out / "suite.yaml"
    out.mkdir(parents=True, exist_ok=True)
    suite.write_text(yaml.safe_dump({"name": "hubness", "tasks": [task]}, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "vlp", "eval", "--model", model, "--suite", str(suite), "--out",
                           str(out / "eval"), "--quiet"], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads((out / "eval" / "report.json").read_text())["tasks"][task["name"]]["metrics"]


def _rows(name: str, metrics: dict) -> list[list]:
    rows = []
    for label, suffix in VARIANTS:
        rows.append([name, label, *(f"{100 * metrics[f'{d}_retrieval_recall@1{suffix}']:.1f}"
                                    for d in ("image", "text"))])  # image_retrieval: text -> image
    return rows


def demo_case(model: str, work: Path) -> list[list]:
    from vlp.data_tools.synth import generate

    bank_dir = work / "demo-bank"
    csv_path = generate(bank_dir, n=1000, seed=424242, image_size=64, progress=False)
    with open(csv_path, newline="") as fh:
        pairs = [(str(bank_dir / r["url"]), r["caption"]) for r in csv.DictReader(fh)]
    task = {"name": "retrieval", "type": "retrieval", "dataset": {"format": "synthetic", "n": 500,
                                                                   "captions_per_image": 2}, "recall_k": [1]}
    return _rows("demo (synthetic)", _evaluate(model, task, _banks(work / "demo-banks", pairs), work / "demo"))


def real_case(model: str, set_name: str, sets_work: Path, work: Path) -> list[list]:
    data = sets_work / ("data" if set_name == "emoji" else "data-openmoji")
    with open(data / "train.csv", newline="") as fh:
        pairs = [(r["url"], r["caption"]) for r in csv.DictReader(fh)]
    task = {"name": "style", "type": "retrieval", "recall_k": [1],
            "dataset": {"format": "csv", "path": str(data / "style.csv")}}
    return _rows(f"{set_name} (style)", _evaluate(model, task, _banks(work / f"{set_name}-banks", pairs),
                                                  work / set_name))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", default="runs/demo", help="the demo's run (vlp demo makes runs/demo)")
    p.add_argument("--real", default="openmoji", choices=["emoji", "openmoji"])
    p.add_argument("--real-model", help="a run trained on the real set (bench/curation.py --real makes one)")
    p.add_argument("--sets-work", type=Path, default=Path("/tmp/vlp-bench-real"))
    p.add_argument("--work", type=Path, default=Path("/tmp/vlp-bench-hubness"))
    a = p.parse_args()
    rows = demo_case(a.demo, a.work)
    if a.real_model:
        rows += real_case(a.real_model, a.real, a.sets_work, a.work)
    table = {"title": "Retrieval R@1 (%) with hubness normalisations (banks: other pairs, never the evaluated set)",
             "columns": ["set", "normalisation", "text->image R@1", "image->text R@1"], "rows": rows}
    print(markdown(table))
    write_result("hubness", "QB-Norm and DBNorm against plain retrieval", [table], order=70,
                 about="beta 20 (both banks), k 1; QB-Norm with the same bank files as its query bank")


if __name__ == "__main__":
    main()
