"""A/B of B3 batch mining at equal samples seen: random batches against mined ones, at two batch sizes.

    python bench/b3.py [--samples 32000] [--pairs 20000] [--batches 64,256] [--cluster-size 16] [--seeds 1]
    python bench/b3.py --real openmoji   # a real set of bench/real_sets.py's, vlp-tiny, its own suite

On the demo's shards (or a real set's): a teacher (vlp-tiny-rn, or vlp-tiny on a real set, trained
plainly, seed 100, on the same shards: no pretrained weights can be fetched here) embeds every sample (`vlp shards embed`); `vlp shards
mine-batches` makes the plan; then for each batch size, arm A trains vlp-tiny-rn from scratch
with the plan's usual random batches and arm B with `data.batch_plan` (same samples, steps,
schedule and seeds), both evaluated on the default suite (a real set: its own suite). Printed: each metric per arm, B - A in
points, and the training time (B's loader reads each sample by seeking).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

import real_sets  # noqa: E402
import time_to_quality as ttq  # noqa: E402
from baselines import Recipe, markdown, train_vlp, write_result  # noqa: E402
from compare import METRICS, demo_shards, evaluate  # noqa: E402


def demo_setting(pairs: int) -> tuple[Path, Recipe, list[str], object]:
    """The demo's shards, its model and recipe, the default suite's metrics."""
    def scores(weights: Path, model: str, out: Path) -> dict[str, float]:
        report = evaluate(weights, model, out)
        return {column: 100 * report["tasks"][task]["metrics"][key] for column, task, key in METRICS}
    return demo_shards(pairs), Recipe(), [c for c, _, _ in METRICS], scores


def real_setting(name: str, work: Path) -> tuple[Path, Recipe, list[str], object]:
    """A real set's shards and suite, with bench/real_sets.py's model and recipe."""
    shards, suite, _ = real_sets.SETS[name](work)
    recipe = Recipe(model="vlp-tiny", lr=1e-3, warmup=50, weight_decay=0.1)
    return shards, recipe, real_sets.COLUMNS, lambda weights, model, out: ttq.evaluate(weights, model, suite, out)


def mined_plan(shards: Path, work: Path, samples: int, cluster_size: int, recipe: Recipe) -> Path:
    """Teacher run, embeddings and plan (kept in work/ between runs of this script)."""
    plan = work / f"plan-c{cluster_size}.npz"
    if plan.exists():
        return plan
    teacher = train_vlp(shards, work / "teacher", replace(recipe, steps=samples // 128), extra=("train.seed=100",))
    emb = work / "emb"
    subprocess.run([sys.executable, "-m", "vlp", "shards", "embed", str(shards), "--model", str(teacher.weights),
                    "--out", str(emb), "--quiet"], check=True)
    out = subprocess.run([sys.executable, "-m", "vlp", "shards", "mine-batches", str(shards), "--embeddings", str(emb),
                          "--out", str(plan), "--cluster-size", str(cluster_size)], check=True, capture_output=True,
                         text=True).stdout
    print("  " + out.strip(), flush=True)
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=32_000)
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--cluster-size", type=int, default=16)
    parser.add_argument("--random-share", type=float, default=0.2, help="data.batch_plan_random in arm B")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--real", choices=sorted(real_sets.SETS), help="a real set instead of the demo's shards")
    parser.add_argument("--real-work", default="/tmp/vlp-bench-real", help="where bench/real_sets.py keeps its sets")
    parser.add_argument("--work", default="/tmp/vlp-bench-b3")
    args = parser.parse_args()
    work = Path(args.work) / (args.real or "")
    shards, base, metrics, scores = (real_setting(args.real, Path(args.real_work)) if args.real
                                     else demo_setting(args.pairs))
    plan = mined_plan(shards, work, args.samples, args.cluster_size, base)
    columns, rows = ["metric"], {c: [c] for c in metrics}
    rows["training time (s)"] = ["training time (s)"]
    for batch in (int(b) for b in args.batches.split(",")):
        recipe = replace(base, steps=args.samples // batch, batch=batch)
        arms = {"A": (), "B": (f"data.batch_plan={plan}", f"data.batch_plan_random={args.random_share}")}
        reports: dict[str, list] = {arm: [] for arm in arms}
        for seed in range(args.seeds):
            for arm, extra in arms.items():
                out = work / f"{arm}-b{batch}-seed{seed}"
                run = train_vlp(shards, out, recipe, extra=(*extra, f"train.seed={seed}"))
                reports[arm].append((run, scores(run.weights, recipe.model, out / "eval")))
                print(f"  batch {batch}, {arm}, seed {seed}: {run.seconds:.0f} s", flush=True)
        columns += [f"A random, batch {batch}", f"B mined, batch {batch}", "B - A"]
        for column in metrics:
            a, b = (sum(r[column] for _, r in reports[arm]) / args.seeds for arm in arms)
            rows[column] += [f"{a:.1f}", f"{b:.1f}", f"{b - a:+.1f}"]
        a, b = (sum(run.seconds for run, _ in reports[arm]) / args.seeds for arm in arms)
        rows["training time (s)"] += [f"{a:.0f}", f"{b:.0f}", f"{b - a:+.0f}"]
    where = f"{base.model} on {args.real}'s shards, its suite" if args.real else f"{base.model} on the demo's shards"
    table = {"title": f"B3 batch mining A/B, {where}, {args.samples} samples per run, communities of <= "
                      f"{args.cluster_size}, {args.random_share:.0%} random batches in B, mean of {args.seeds} "
                      f"seed(s) (%){'' if args.real else ', default suite'}",
             "columns": columns, "rows": list(rows.values())}
    print(markdown(table))
    write_result(f"b3_{args.real}" if args.real else "b3", "B3 batch mining, A/B at equal samples seen"
                 + (f" ({args.real}, real drawings)" if args.real else ""), [table], order=64 if args.real else 63)


if __name__ == "__main__":
    main()
