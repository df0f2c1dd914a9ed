"""Time to quality: accuracy against wall time, vlp's recipe vs open_clip_train, on real emoji images.

    python bench/time_to_quality.py [--epochs 40] [--evals 10] [--work /tmp/vlp-bench-ttq]

The set: emoji images with their names, from three npm packages (MIT-licensed, fetched
with `npm pack` into --work on first use, never committed): emoji-datasource-twitter
(Twemoji artwork), emoji-datasource-google (Noto Color Emoji artwork) and emojilib
(keywords per emoji). Why emoji: a registry ships them; they are real drawings of
~1,900 concepts with a name each, a category, and more words per concept (several
captions); and two artists drew the same concepts, so a held-out split can be of a
*different visual style*: training sees only Twemoji, evaluation only Noto.

Split, by a hash of the emoji's code point: 80% of the concepts train (Twemoji images,
caption = the name; vlp's shards also keep the short names and emojilib keywords as
further captions, `--caption-cols`); the other 20% are never trained on. Evaluation,
all on Noto images, with `vlp eval`:
- style: retrieval between the trained concepts' Noto images and their names
  (the headline: image->text R@1; the same names, a style never seen),
- novel: retrieval on the held-out concepts (names and images never seen),
- category: zero-shot category (9 classes) of the held-out concepts.

Both tools train the same model (vlp-tiny, 64 px ViT, from scratch) on the same shards,
the same number of epochs, batch, peak learning rate, warm-up and weight decay, with the
same data workers: vlp with configs/recipe-small.yaml, open_clip_train with its own
augmentation, loss and loader. Each saves a checkpoint every few epochs; wall time of a
checkpoint = its file's time minus the command's start (start-up included, evaluation
not: checkpoints are evaluated afterwards). Prints the table and the time each tool takes
to reach open_clip_train's final accuracy; writes bench/results/time_to_quality.{json,png}.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from baselines import REPO, RESULTS, Recipe, markdown, train_open_clip, write_result  # noqa: E402

PACKAGES = {"twitter": "emoji-datasource-twitter@16.0.0", "google": "emoji-datasource-google@16.0.0",
            "emojilib": "emojilib@4.0.3"}
METRICS = [  # (column, task, metric key in report.json)
    ("style I->T R@1", "style", "text_retrieval_recall@1"),
    ("style T->I R@1", "style", "image_retrieval_recall@1"),
    ("novel I->T R@1", "novel", "text_retrieval_recall@1"),
    ("category acc", "category", "acc1"),
]
HEADLINE = "style I->T R@1"


# ---------------------------------------------------------------- the data


def fetch(work: Path) -> dict[str, Path]:
    """Each npm package unpacked under work/npm/<name>/package (npm pack: the registry's own client)."""
    root = work / "npm"
    root.mkdir(parents=True, exist_ok=True)
    found = {}
    for name, spec in PACKAGES.items():
        folder = root / name
        if not (folder / "package" / "package.json").exists():
            tgz = subprocess.run(["npm", "pack", spec, "--silent"], cwd=root, check=True, capture_output=True,
                                 text=True).stdout.strip().splitlines()[-1]
            folder.mkdir(exist_ok=True)
            with tarfile.open(root / tgz) as tar:
                tar.extractall(folder, filter="data")
            (root / tgz).unlink()
        found[name] = folder / "package"
    return found


def _char(code: str) -> str:
    return "".join(chr(int(h, 16)) for h in code.split("-"))


def emoji_rows(pkgs: dict[str, Path]) -> list[dict]:
    """Every emoji both artists drew (skin-tone variants and the 'Component' swatches left out)."""
    table = json.loads((pkgs["twitter"] / "emoji.json").read_text())
    keywords = json.loads((pkgs["emojilib"] / "dist" / "emoji-en-US.json").read_text())
    rows = []
    for e in table:
        if not (e.get("has_img_twitter") and e.get("has_img_google")) or e["category"] == "Component":
            continue
        name = e["name"].lower()
        words = keywords.get(_char(e["unified"])) or keywords.get(_char(e["non_qualified"] or e["unified"]), [])
        rows.append({
            "code": e["unified"], "name": name, "category": e["category"].lower().replace("&", "and"),
            "short": " ".join(s.replace("_", " ").replace("-", " ") for s in e["short_names"]),
            "keywords": ", ".join(w.replace("_", " ") for w in words[1:6]),
            "twitter": str(pkgs["twitter"] / "img" / "twitter" / "64" / e["image"]),
            "google": str(pkgs["google"] / "img" / "google" / "64" / e["image"]),
            "held_out": int(hashlib.sha1(e["unified"].encode()).hexdigest(), 16) % 5 == 0,
        })
    return rows


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def prepare(work: Path) -> tuple[Path, Path, dict]:
    """Shards of the training split, the eval suite of the Noto split, and the counts."""
    rows = emoji_rows(fetch(work))
    train = [r for r in rows if not r["held_out"]]
    novel = [r for r in rows if r["held_out"]]
    data = work / "data"
    data.mkdir(exist_ok=True)
    _write_csv(data / "train.csv", [{"url": r["twitter"], "caption": r["name"], "short": r["short"],
                                     "keywords": r["keywords"]} for r in train], ["url", "caption", "short", "keywords"])
    _write_csv(data / "style.csv", [{"image": r["google"], "caption": r["name"]} for r in train], ["image", "caption"])
    _write_csv(data / "novel.csv", [{"image": r["google"], "caption": r["name"]} for r in novel], ["image", "caption"])
    _write_csv(data / "category.csv", [{"image": r["google"], "label": r["category"]} for r in novel],
               ["image", "label"])
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "vlp", "shards", "build", str(data / "train.csv"), "--output",
                        str(shards), "--image-size", "64", "--shard-size", "500", "--caption-cols", "short,keywords",
                        "--quiet"], check=True)
    classes = sorted({r["category"] for r in rows})
    suite = {"name": "emoji", "description": "Noto emoji: trained concepts in a new style, and held-out concepts",
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


# ---------------------------------------------------------------- training and evaluation


def train_vlp_recipe(shards: Path, out: Path, steps: int, every: int, r: Recipe, preset: str,
                     extra: list[str]) -> float:
    """configs/<preset>.yaml on the shards; returns the command's start time (epoch seconds)."""
    shutil.rmtree(out, ignore_errors=True)  # this bench's own run folder: vlp refuses to train into a used one
    start = time.time()
    cmd = [sys.executable, "-m", "vlp", "train", "--config", str(REPO / "configs" / f"{preset}.yaml"),
           f"data.sources=[{{shards: '{shards}'}}]", f"data.workers={r.workers}", f"model.name={r.model}",
           f"train.batch_size={r.batch}", f"train.steps={steps}", f"optim.lr={r.lr}",
           f"optim.warmup_steps={r.warmup}", f"optim.weight_decay={r.weight_decay}",
           f"train.checkpoint_every={every}", "train.keep_last=1000", f"train.output_dir={out}", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"vlp train failed:\n{done.stderr[-3000:]}")
    return start


def checkpoints(out: Path, tool: str) -> list[tuple[Path, float]]:
    """(checkpoint, file time) of a run, in training order."""
    if tool == "vlp":
        found = sorted((out / "checkpoints").glob("step_*"))
        return [(p, (p / "model.safetensors").stat().st_mtime if (p / "model.safetensors").exists()
                 else p.stat().st_mtime) for p in found]
    found = sorted((out / "bench" / "checkpoints").glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    return [(p, p.stat().st_mtime) for p in found]


def evaluate(checkpoint: Path, model: str, suite: Path, out: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "vlp", "eval", "--suite", str(suite), "--out", str(out), "--quiet"]
    cmd += ["--model", str(checkpoint)] if checkpoint.is_dir() else ["--model", model, "--weights", str(checkpoint)]
    subprocess.run(cmd, check=True, capture_output=True)
    report = json.loads((out / "report.json").read_text())
    return {column: 100 * report["tasks"][task]["metrics"][key] for column, task, key in METRICS}


def curve(out: Path, tool: str, start: float, model: str, suite: Path) -> list[dict]:
    """Every checkpoint of a run evaluated (once: kept in curve.json next to the run)."""
    cached = out.parent / f"{out.name}.curve.json"
    if cached.exists() and cached.stat().st_mtime > max(stamp for _, stamp in checkpoints(out, tool)):
        return json.loads(cached.read_text())
    points = []
    for checkpoint, stamp in checkpoints(out, tool):
        metrics = evaluate(checkpoint, model, suite, out / "eval" / checkpoint.stem)
        points.append({"seconds": stamp - start, **metrics})
        print(f"  {tool} {checkpoint.name}: {stamp - start:.0f} s, " +
              ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()), flush=True)
    cached.write_text(json.dumps(points))
    return points


def time_to_reach(points: list[dict], target: float) -> float | None:
    """Wall seconds of the first checkpoint at or above target (None: never)."""
    return next((p["seconds"] for p in points if p[HEADLINE] >= target), None)


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, (column, _, _) in zip(axes, METRICS, strict=True):
        for tool, points in curves.items():
            ax.plot([p["seconds"] for p in points], [p[column] for p in points], marker="o", label=tool)
        ax.set_title(column)
        ax.set_xlabel("wall time (s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--evals", type=int, default=10, help="checkpoints evaluated per run")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--preset", default="recipe-small", help="vlp's preset (configs/NAME.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for vlp's run (ablations), e.g. --set data.multi_caption=false")
    parser.add_argument("--name", default=None, help="name of vlp's run folder (default: vlp-<preset>)")
    parser.add_argument("--work", default="/tmp/vlp-bench-ttq")
    parser.add_argument("--only", choices=["vlp", "open_clip_train"], help="train one tool (the other's run is reused)")
    args = parser.parse_args()
    work = Path(args.work)
    shards, suite, counts = prepare(work)
    per_epoch = counts["train"] // args.batch
    steps = per_epoch * args.epochs
    every_epochs = max(1, args.epochs // args.evals)
    print(f"emoji set: {counts['train']} training pairs (Twemoji), {counts['held_out']} held-out concepts, "
          f"{counts['categories']} categories; {args.epochs} epochs x {per_epoch} steps of {args.batch}", flush=True)
    r = Recipe(model="vlp-tiny", batch=args.batch, steps=steps, workers=args.workers, lr=args.lr,
               warmup=args.warmup, weight_decay=0.2)
    curves: dict[str, list[dict]] = {}
    runs = {"open_clip_train": work / "open_clip", "vlp": work / (args.name or f"vlp-{args.preset}")}
    for tool, out in runs.items():
        stamp_file = out.parent / f"{out.name}.start"
        if args.only in (None, tool):
            if tool == "vlp":
                start = train_vlp_recipe(shards, out, steps, per_epoch * every_epochs, r, args.preset, args.set)
            else:
                start = time.time()
                train_open_clip(shards, out, r, save=True, epochs=args.epochs, every=every_epochs)
            stamp_file.write_text(str(start))
        curves[tool] = curve(out, tool, float(stamp_file.read_text()), r.model, suite)
    target = curves["open_clip_train"][-1][HEADLINE]
    oc_time = time_to_reach(curves["open_clip_train"], target)
    vlp_time = time_to_reach(curves["vlp"], target)
    rows = []
    for tool, points in curves.items():
        reach = time_to_reach(points, target)
        rows.append([tool, f"{points[-1]['seconds']:.0f}", *[f"{points[-1][c]:.1f}" for c, _, _ in METRICS],
                     "never" if reach is None else f"{reach:.0f}"])
    table = {"title": f"time to quality, vlp-tiny from scratch, {args.epochs} epochs, {os.cpu_count()} CPU cores "
                      f"(vlp: configs/{args.preset}.yaml)",
             "columns": ["tool", "wall s (all epochs)", *[c for c, _, _ in METRICS],
                         f"s to reach open_clip_train's final {HEADLINE}"], "rows": rows}
    print(markdown(table))
    final_ratio = curves["vlp"][-1][HEADLINE] / max(target, 1e-9)
    time_ratio = "n/a" if vlp_time is None or not oc_time else f"{vlp_time / oc_time:.2f}x"
    verdict = (f"vlp reaches open_clip_train's final {HEADLINE} ({target:.1f}) in {time_ratio} of open_clip_train's "
               f"time; final {HEADLINE}: {final_ratio:.2f}x open_clip_train's")
    print("\n" + verdict)
    plot(curves, RESULTS / "time_to_quality.png")
    write_result("time_to_quality", "Time to quality on real drawings: vlp's recipe vs open_clip_train", [table],
                 order=30, notes=verdict, plots=["time_to_quality.png"], curves=curves)

if __name__ == "__main__":
    main()
