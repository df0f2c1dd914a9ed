"""The README's results table: vlp vs open_clip_train, same model, shards and samples seen, in one run.

    python bench/compare.py [--samples 96000] [--model vlp-tiny-rn]

Four training runs from scratch on the demo's synthetic shards, with the
demo's recipe (AdamW lr 2e-3, warmup 100, weight decay 0.1, clip 1.0, fp32,
1 data worker, one process):

    vlp train          contrastive batch 128
    open_clip_train    contrastive batch 128
    vlp train          contrastive batch 512 by gradient caching (chunks of 128)
    open_clip_train    contrastive batch 512 by --accum-freq 4 (its feature caching)

each for the same number of samples, then `vlp eval` of every trained model
on the default suite (held-out synthetic sets). Printed: training samples/s
(median per step after warm-up), peak RSS of the largest process, wall time,
and the suite's headline metrics, as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from baselines import REPO, Recipe, markdown, train_open_clip, train_vlp, write_result  # noqa: E402

METRICS = [  # (column, task, metric)
    ("shape", "shape_zeroshot", "acc1"),
    ("colour", "colour_zeroshot", "acc1"),
    ("T->I R@1", "retrieval", "image_retrieval_recall@1"),
    ("I->T R@1", "retrieval", "text_retrieval_recall@1"),
    ("counting", "counting", "acc1"),
    ("attr. swap", "binding", "acc/swap_att"),
    ("relation", "binding", "acc/replace_rel"),
    ("wino group", "winoground", "group_score"),
]


def demo_shards(pairs: int) -> Path:
    """The shards `vlp demo` builds (made here with the demo's own stages if missing)."""
    from vlp.app.demo import _shards, _synth
    from vlp.core.config import DemoRunConfig, load_config

    cfg = load_config(REPO / "configs" / "demo.yaml", [f"demo.pairs={pairs}"], DemoRunConfig)
    return _shards(cfg, _synth(cfg))


def evaluate(weights: Path, model: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "vlp", "eval", "--suite", "default", "--out", str(out), "--quiet"]
    if weights.is_dir():
        cmd += ["--model", str(weights)]
    else:
        cmd += ["--model", model, "--weights", str(weights)]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads((out / "report.json").read_text())


def _value(report: dict, task: str, metric: str) -> str:
    value = report["tasks"].get(task, {}).get("metrics", {}).get(metric)
    return "n/a" if value is None else f"{100 * value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=96_000)
    parser.add_argument("--pairs", type=int, default=50_000)
    parser.add_argument("--model", default="vlp-tiny-rn")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--work", default="/tmp/vlp-bench-compare")
    args = parser.parse_args()
    work = Path(args.work)
    shards = demo_shards(args.pairs)
    steps = args.samples // args.batch
    runs = []
    for label, tool, accum in [(f"{args.batch}", "vlp", 1), (f"{args.batch}", "open_clip_train", 1),
                               (f"{4 * args.batch} (gradient caching)", "vlp", 4),
                               (f"{4 * args.batch} (accum-freq 4)", "open_clip_train", 4)]:
        r = Recipe(model=args.model, batch=args.batch, steps=steps // accum)
        out = work / f"{tool}-{accum}"
        if tool == "vlp":
            run = train_vlp(shards, out, r, batch=args.batch * accum, micro=args.batch if accum > 1 else None)
        else:
            run = train_open_clip(shards, out, r, accum=accum, save=True)
        report = evaluate(run.weights, args.model, out / "eval")
        runs.append((label, run, report))
        print(f"  {tool} batch {label}: {run.samples_per_s:.0f} samples/s, peak {run.peak_rss_mb:.0f} MiB, "
              f"{run.seconds:.0f} s", flush=True)
    head = ["tool", "contrastive batch", "samples/s", "peak RSS MiB", "wall s"] + [c for c, _, _ in METRICS]
    rows = [[run.tool, label, f"{run.samples_per_s:.0f}", f"{run.peak_rss_mb:.0f}", f"{run.seconds:.0f}",
             *[_value(report, task, metric) for _, task, metric in METRICS]] for label, run, report in runs]
    table = {"title": f"{args.model}, {args.samples} samples seen, demo recipe; metrics in % on the default suite "
                      "(held-out synthetic sets)", "columns": head, "rows": rows}
    print(markdown(table))
    write_result("compare", "vlp vs open_clip_train on the demo's model and shards", [table], order=20)

if __name__ == "__main__":
    main()
