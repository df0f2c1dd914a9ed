"""A/B of the hard-negative loss term at equal budget: the demo's recipe with and without it.

    python bench/hard_negatives.py [--samples 96000] [--k 1] [--weight 0.5] [--from-step N] [--mode pairwise] [--seeds 2]
                                   [--negatives synthetic|counts]

Both arms train vlp-tiny-rn from scratch on the demo's shards for the same
number of samples and steps (same batch, schedule, seeds); B adds k
counterfactual captions per image (wrong count, swapped colours, swapped
relation: the synthetic generator's `hard_negatives`) through the loss's
hard-negative term (`pairwise`: a separate -log(e^pos / (e^pos + e^neg))
term per image, as in "Teaching CLIP to Count"; `denominator`: extra columns
of the image->text softmax), from --from-step on (default: half way, so the
model learns shapes and colours before it is pushed on counts and binding;
from step 0 at weight 1 it gained as much counting but lost shape accuracy on
one seed in two). Each arm runs `--seeds` seeds (train.seed
0, 1, ...) and is evaluated on the default suite; printed are the means,
B - A in points, and the training time (the extra captions cost text-tower
compute).

`--negatives counts`: B's negatives come not from the generator but from the
captions themselves, as for real data: the demo's pairs built again with `vlp
shards build --count-counterfactuals` (a caption stating a count gets copies
with the number swapped; "Teaching CLIP to Count to Ten"), the generator's
counterfactuals left out; both arms read those shards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from baselines import Recipe, markdown, train_vlp, write_result  # noqa: E402
from compare import METRICS, demo_shards, evaluate  # noqa: E402


def count_shards(shards: Path) -> Path:
    """The demo's pairs built again with counterfactual counts from the captions (and without the generator's)."""
    from vlp.data_tools.build import build_shards

    from vlp.core.config import ShardsBuildConfig

    out = shards.parent / "shards-count-counterfactuals"
    if not (out / "manifest.json").exists():
        opts = ShardsBuildConfig(inputs=[str(shards.parent / "synth" / "pairs.csv")], output=str(out), image_size=64,
                                 resize_mode="border", keep_cols=["kind"], count_counterfactuals=True, workers=2)
        print("  " + build_shards(opts, progress=False).line(), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=96_000)
    parser.add_argument("--pairs", type=int, default=50_000)
    parser.add_argument("--k", type=int, default=1, help="hard negatives per image in run B")
    parser.add_argument("--weight", type=float, default=0.5, help="loss.hard_negative_weight in run B")
    parser.add_argument("--from-step", type=int, help="data.hard_negatives_from_step in run B (default: half way)")
    parser.add_argument("--mode", default="pairwise", choices=["pairwise", "denominator"])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--negatives", default="synthetic", choices=["synthetic", "counts"])
    parser.add_argument("--work", default="/tmp/vlp-bench-hardneg")
    args = parser.parse_args()
    work = Path(args.work) / args.negatives
    shards = demo_shards(args.pairs)
    if args.negatives == "counts":
        shards = count_shards(shards)
    recipe = Recipe(model="vlp-tiny-rn", steps=args.samples // 128)
    from_step = recipe.steps // 2 if args.from_step is None else args.from_step
    arms = {
        "A: contrastive only": (),
        f"B: + {args.k} hard negative(s)/image ({args.mode}, weight {args.weight}, from step {from_step})": (
            f"data.hard_negatives={args.k}", f"loss.hard_negative_weight={args.weight}",
            f"loss.hard_negative_mode={args.mode}", f"data.hard_negatives_from_step={from_step}"),
    }
    results: dict[str, list] = {name: [] for name in arms}
    for seed in range(args.seeds):
        for name, extra in arms.items():
            out = work / f"{name[0]}-seed{seed}"
            run = train_vlp(shards, out, recipe, extra=(*extra, f"train.seed={seed}"))
            results[name].append((run, evaluate(run.weights, recipe.model, out / "eval")))
            print(f"  {name}, seed {seed}: trained in {run.seconds:.0f} s ({run.samples_per_s:.0f} samples/s)",
                  flush=True)

    def mean(name: str, task: str, metric: str) -> float:
        values = [report["tasks"][task]["metrics"][metric] for _, report in results[name]]
        return 100 * sum(values) / len(values)

    a, b = arms
    rows = []
    for column, task, metric in METRICS:
        va, vb = mean(a, task, metric), mean(b, task, metric)
        rows.append([column, f"{va:.1f}", f"{vb:.1f}", f"{vb - va:+.1f}"])
    ta, tb = (sum(run.seconds for run, _ in results[n]) / args.seeds for n in (a, b))
    rows.append(["training time (s)", f"{ta:.0f}", f"{tb:.0f}", f"{tb - ta:+.0f}"])
    source = ("the generator's counterfactuals" if args.negatives == "synthetic" else
              "counterfactual counts made from the captions at shard build")
    table = {"title": f"hard-negative A/B, vlp-tiny-rn, {args.samples} samples per run, mean of {args.seeds} "
                      f"seed(s), negatives: {source}, default suite (%)", "columns": ["metric", a, b, "B - A"],
             "rows": rows}
    print(markdown(table))
    name = "hard_negatives" if args.negatives == "synthetic" else "count_counterfactuals"
    write_result(name, "Hard negatives (counting- and composition-aware training), A/B" if args.negatives ==
                 "synthetic" else "Counting from the captions' counts (--count-counterfactuals), A/B", [table],
                 order=60 if args.negatives == "synthetic" else 61)

if __name__ == "__main__":
    main()
