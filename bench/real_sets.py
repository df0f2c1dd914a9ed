"""vlp against open_clip_train on real image-text sets, several seeds each: plain, and with vlp's recipe.

    python bench/real_sets.py [--sets emoji,openmoji] [--tools open_clip_train,vlp,vlp-recipe]
                              [--seeds 0,1,2] [--samples 60000] [--work /tmp/vlp-bench-real]
                              [--json real_sets] [--set KEY=VALUE --label NAME]

The sets (npm packages fetched with `npm pack` into --work on first use, never committed):
- emoji: Twemoji drawings with their names to train, Noto's drawings of the same concepts to
  evaluate (bench/time_to_quality.py's set; vlp's recipe, configs/recipe-small.yaml, was
  chosen on it);
- openmoji: OpenMoji (another artist, CC-BY-SA-4.0; package openmoji), trained on its colour
  drawings with their names, evaluated on its black line drawings, a style never trained on.
  The recipe was not chosen on it. Its SVGs are rendered to 64 px PNGs with cairosvg (in a
  virtualenv of its own under bench/).
Each holds out a fifth of its concepts (by a hash of the code point): evaluation is retrieval
between the trained concepts' images in the other style and their names ("style", the
headline: image->text R@1), retrieval on the held-out concepts ("novel") and zero-shot
category of the held-out concepts. The training rows stay in the package's own order (sorted
by code point: like a crawl sorted by domain), and both tools read the same shards.

The tools, at one recipe (vlp-tiny, 64 px ViT from scratch; batch 128, lr 1e-3, weight decay
0.1, warm-up 50, fp32, one loader worker, the same number of samples):
- open_clip_train: `python -m open_clip_train.main` with its own defaults for everything else;
- vlp: `vlp train` with its own defaults for everything else ("plain");
- vlp-recipe: `vlp train --config configs/recipe-small.yaml`, the same data, model and budget.
`--set KEY=VALUE` (repeatable) adds overrides to vlp's runs, named `--label` (ablations).
Each (set, tool, seed) is trained once and its result kept in --work/results; the table gives
mean and spread (min-max) over the seeds, and each column against open_clip_train's mean.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

import time_to_quality as ttq  # noqa: E402
from baselines import REPO, Recipe, markdown, measured, open_clip_python, venv_python, write_result  # noqa: E402

COLUMNS = [c for c, _, _ in ttq.METRICS]
ABOUT = ("vlp-tiny (64 px ViT) from scratch; batch 128, lr 1e-3, weight decay 0.1, warm-up 50, fp32, one loader "
         "worker, for every tool; open_clip_train and plain vlp otherwise at their own defaults; vlp-recipe: "
         "configs/recipe-small.yaml. emoji: Twemoji to train, Noto to evaluate (the recipe was chosen on it); "
         "openmoji: OpenMoji's colour drawings to train, its black drawings to evaluate (not chosen on). "
         "style = the trained concepts in the other style; novel = held-out concepts; category = zero-shot "
         "category of the held-out concepts.")
OPENMOJI = "openmoji@17.0.0"

# ---------------------------------------------------------------- the second set: OpenMoji

RENDER = """
import sys, cairosvg
from pathlib import Path
for line in Path(sys.argv[1]).read_text().splitlines():
    src, dst = line.split("\\t")
    if not Path(dst).exists() and not Path(dst + ".failed").exists():
        try:
            cairosvg.svg2png(url=src, write_to=dst, output_width=64, output_height=64, background_color="white")
        except Exception as err:  # an SVG feature cairosvg lacks: that concept is left out, and counted
            Path(dst + ".failed").write_text(repr(err))
"""


def _openmoji(work: Path) -> Path:
    root = work / "npm" / "openmoji"
    if not (root / "package" / "data" / "openmoji.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tgz = subprocess.run(["npm", "pack", OPENMOJI, "--silent"], cwd=root, check=True, capture_output=True,
                             text=True).stdout.strip().splitlines()[-1]
        subprocess.run(["tar", "xzf", tgz], cwd=root, check=True)
        (root / tgz).unlink()
    return root / "package"


def prepare_openmoji(work: Path) -> tuple[Path, Path, dict]:
    """Shards of the colour drawings of the training concepts, and the suite on the black drawings."""
    pkg = _openmoji(work)
    rows = [e for e in json.loads((pkg / "data" / "openmoji.json").read_text())
            if not e["skintone"] and e["group"] != "component"]
    data = work / "data-openmoji"
    images = data / "png"
    images.mkdir(parents=True, exist_ok=True)
    jobs = []
    for e in rows:
        for style in ("color", "black"):
            jobs.append(f"{pkg / style / 'svg' / (e['hexcode'] + '.svg')}\t{images / style}-{e['hexcode']}.png")
    todo = data / "render.tsv"
    todo.write_text("\n".join(jobs))
    subprocess.run([str(venv_python("render", ["cairosvg"])), "-c", RENDER, str(todo)], check=True)
    drawn = [e for e in rows if all((images / f"{s}-{e['hexcode']}.png").exists() for s in ("color", "black"))]
    if len(drawn) < len(rows):
        print(f"openmoji: {len(rows) - len(drawn)} of {len(rows)} drawings could not be rendered; left out")
    rows = drawn
    table = []
    for e in rows:
        table.append({"code": e["hexcode"], "name": e["annotation"], "category": e["group"].replace("-", " "),
                      "keywords": e["tags"], "color": str(images / f"color-{e['hexcode']}.png"),
                      "black": str(images / f"black-{e['hexcode']}.png"),
                      "held_out": int(hashlib.sha1(e["hexcode"].encode()).hexdigest(), 16) % 5 == 0})
    train = [r for r in table if not r["held_out"]]
    novel = [r for r in table if r["held_out"]]
    ttq._write_csv(data / "train.csv", [{"url": r["color"], "caption": r["name"], "keywords": r["keywords"]}
                                        for r in train], ["url", "caption", "keywords"])
    ttq._write_csv(data / "style.csv", [{"image": r["black"], "caption": r["name"]} for r in train], ["image", "caption"])
    ttq._write_csv(data / "novel.csv", [{"image": r["black"], "caption": r["name"]} for r in novel], ["image", "caption"])
    ttq._write_csv(data / "category.csv", [{"image": r["black"], "label": r["category"]} for r in novel],
                   ["image", "label"])
    shards = work / "shards-openmoji"
    if not (shards / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "vlp", "shards", "build", str(data / "train.csv"), "--output",
                        str(shards), "--image-size", "64", "--shard-size", "500", "--caption-cols", "keywords",
                        "--quiet"], check=True)
    classes = sorted({r["category"] for r in table})
    suite = {"name": "openmoji", "description": "OpenMoji black drawings: trained concepts, held-out concepts",
             "tasks": [
                 {"name": "style", "type": "retrieval", "recall_k": [1, 5],
                  "dataset": {"format": "csv", "path": str(data / "style.csv")}},
                 {"name": "novel", "type": "retrieval", "recall_k": [1, 5],
                  "dataset": {"format": "csv", "path": str(data / "novel.csv")}},
                 {"name": "category", "type": "zeroshot_classification",
                  "templates": ["an emoji of {c}.", "{c}"],
                  "dataset": {"format": "csv", "path": str(data / "category.csv"), "classnames": classes}},
             ]}
    suite_path = data / "suite.yaml"
    suite_path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return shards, suite_path, {"train": len(train), "held_out": len(novel), "categories": len(classes)}


SETS = {"emoji": ttq.prepare, "openmoji": prepare_openmoji}

# ---------------------------------------------------------------- runs


def _vlp_run(shards: Path, out: Path, r: Recipe, seed: int, preset: str | None, extra: list[str]) -> tuple[Path, float]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "vlp", "train",
           *(["--config", str(REPO / "configs" / f"{preset}.yaml")] if preset else []),
           f"data.sources=[{{shards: '{shards}'}}]", f"data.workers={r.workers}", f"model.name={r.model}",
           f"train.batch_size={r.batch}", f"train.steps={r.steps}", f"optim.lr={r.lr}",
           f"optim.warmup_steps={r.warmup}", f"optim.weight_decay={r.weight_decay}", f"train.seed={seed}",
           f"train.checkpoint_every={10**6}", f"train.output_dir={out}", *extra]
    _, _, seconds = measured(cmd)
    return sorted((out / "checkpoints").glob("step_*"))[-1], seconds


def _open_clip_run(shards: Path, out: Path, r: Recipe, seed: int) -> tuple[Path, float]:
    """open_clip_train.main with the recipe; every other flag its default (no gradient clipping)."""
    py = open_clip_python()
    last = len(json.loads((shards / "manifest.json").read_text())["shards"]) - 1
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(py), "-m", "open_clip_train.main", "--train-data", f"{shards}/{{00000..{last:05d}}}.tar",
           "--dataset-type", "webdataset", "--train-num-samples", str(r.steps * r.batch), "--batch-size", str(r.batch),
           "--epochs", "1", "--model", r.model, "--lr", str(r.lr), "--wd", str(r.weight_decay), "--warmup",
           str(r.warmup), "--workers", str(r.workers), "--precision", "fp32", "--report-to", "none",
           "--save-frequency", "1", "--logs", str(out), "--name", "bench", "--device", "cpu", "--seed", str(seed)]
    _, _, seconds = measured(cmd)
    return out / "bench" / "checkpoints" / "epoch_1.pt", seconds


def run_one(work: Path, set_name: str, tool: str, seed: int, r: Recipe, label: str, extra: list[str]) -> dict:
    """One training run and its evaluation, kept in work/results (a second call reads it back)."""
    key = f"{set_name}-{label}-{seed}"
    kept = work / "results" / f"{key}.json"
    if kept.exists():
        return json.loads(kept.read_text())
    shards, suite, _ = SETS[set_name](work)
    out = work / "runs" / key
    if tool == "open_clip_train":
        checkpoint, seconds = _open_clip_run(shards, out, r, seed)
    else:
        checkpoint, seconds = _vlp_run(shards, out, r, seed, "recipe-small" if tool == "vlp-recipe" else None, extra)
    metrics = ttq.evaluate(checkpoint, r.model, suite, out / "eval")
    result = {"set": set_name, "tool": tool, "label": label, "seed": seed, "wall_s": round(seconds, 1),
              "overrides": extra, **{k: round(v, 2) for k, v in metrics.items()}}
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(result))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the figures are kept; the weights are not needed
    return result


def summary(results: list[dict], labels: list[str]) -> list[dict]:
    """One table per set: mean (min-max) over seeds of each column, and the ratio to open_clip_train's mean."""
    tables = []
    for set_name in dict.fromkeys(r["set"] for r in results):
        rows = {lab: [r for r in results if r["set"] == set_name and r["label"] == lab] for lab in labels}
        base = rows.get("open_clip_train") or []
        table = {"title": f"{set_name}: mean (min-max) over seeds; x: against open_clip_train's mean",
                 "columns": ["tool", "seeds", "wall s", *COLUMNS], "rows": []}
        for lab, runs in rows.items():
            if not runs:
                continue
            cells = []
            for col in ["wall_s", *COLUMNS]:
                values = [r[col] for r in runs]
                mean = statistics.mean(values)
                cell = f"{mean:.1f} ({min(values):.1f}-{max(values):.1f})"
                ref = statistics.mean(r[col] for r in base) if base and lab != "open_clip_train" else 0
                cells.append(cell + (f" {mean / ref:.2f}x" if ref else ""))
            table["rows"].append([lab, len(runs), *cells])
        tables.append(table)
    return tables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="emoji,openmoji")
    p.add_argument("--tools", default="open_clip_train,vlp,vlp-recipe")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--samples", type=int, default=60_000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for vlp's runs")
    p.add_argument("--label", default=None, help="the name of vlp's runs with --set (default: the overrides)")
    p.add_argument("--kept", default="", metavar="LABEL,...", help="also tabulate these labels' kept runs "
                   "(earlier --set runs: the knobs tried) where they exist")
    p.add_argument("--work", type=Path, default=Path("/tmp/vlp-bench-real"))
    p.add_argument("--json", default=None, metavar="NAME", help="write bench/results/NAME.json (the summary and "
                   "every run's figures)")
    a = p.parse_args()
    r = Recipe(model="vlp-tiny", batch=128, steps=a.samples // 128, workers=a.workers, lr=1e-3, warmup=50,
               weight_decay=0.1)
    results, labels = [], []
    for set_name in a.sets.split(","):
        for tool in a.tools.split(","):
            label = tool if tool == "open_clip_train" or not a.set else (a.label or f"{tool} {' '.join(a.set)}")
            labels.append(label)
            for seed in (int(s) for s in a.seeds.split(",")):
                start = time.time()
                res = run_one(a.work, set_name, tool, seed, r, label, [] if tool == "open_clip_train" else a.set)
                print(f"{set_name} {label} seed {seed}: " + ", ".join(f"{c} {res[c]:.1f}" for c in COLUMNS)
                      + f"; {res['wall_s']:.0f} s" + ("" if time.time() - start > 5 else " (kept)"), flush=True)
                results.append(res)
    for set_name in a.sets.split(","):
        for label in filter(None, a.kept.split(",")):
            for seed in (int(v) for v in a.seeds.split(",")):
                kept = a.work / "results" / f"{set_name}-{label}-{seed}.json"
                if kept.exists():
                    results.append(json.loads(kept.read_text()))
                    labels.append(label)
    tables = summary(results, list(dict.fromkeys(labels)))
    print("\n".join(markdown(t) for t in tables))
    if a.json:
        write_result(a.json, "vlp vs open_clip_train on real drawings, several seeds", tables, order=25,
                     about=ABOUT, samples=a.samples, runs=results)

if __name__ == "__main__":
    main()
