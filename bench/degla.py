"""A/B of DeGLA-style fine-tuning: plain contrastive fine-tuning against DeGLA's terms, from one trained model.

    python bench/degla.py [--base-samples 32000] [--samples 16000] [--pairs 20000] [--lr 2e-4] [--seeds 1]
                          [--base weights.safetensors]

The base: vlp-tiny-rn trained plainly on the demo's shards (or --base). The fine-tuning data: the
demo's pairs built again with `--compositional-negatives --count-counterfactuals` (negatives made
by rules from the captions, not the generator's), read by both arms. Arm A fine-tunes with the
contrastive loss alone; arm B adds DeGLA's terms: an EMA teacher of the model (decay 0.99), the
feature distillation against it, the image-grounded contrast (the pairwise hard-negative term over
one rule-made negative per image) and the text-grounded contrast. Same samples, steps, schedule
and seeds; both evaluated on the default suite with the base beside them: the compositional tasks
(attribute swap, relation, Winoground group) and what fine-tuning should keep (zero-shot shape
and colour, retrieval).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from baselines import Recipe, markdown, train_vlp, write_result  # noqa: E402
from compare import METRICS, demo_shards, evaluate  # noqa: E402

DEGLA = ("loss.ema_teacher=0.99", "loss.distill_weight=0", "loss.feature_distill_weight=1.0",
         "data.hard_negatives=1", "loss.hard_negative_mode=pairwise", "loss.hard_negative_weight=0.5",
         "loss.text_grounded_weight=0.5")


def rule_shards(shards: Path) -> Path:
    """The demo's pairs built again with rule-made negatives from the captions (and without the generator's)."""
    from vlp.data_tools.build import build_shards

    from vlp.core.config import ShardsBuildConfig

    out = shards.parent / "shards-rule-negatives"
    if not (out / "manifest.json").exists():
        opts = ShardsBuildConfig(inputs=[str(shards.parent / "synth" / "pairs.csv")], output=str(out), image_size=64,
                                 resize_mode="border", keep_cols=["kind"], compositional_negatives=True,
                                 count_counterfactuals=True, workers=2)
        print("  " + build_shards(opts, progress=False).line(), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-samples", type=int, default=32_000)
    parser.add_argument("--samples", type=int, default=16_000, help="fine-tuning samples per arm")
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--base", help="weights of a trained vlp-tiny-rn (default: train one here)")
    parser.add_argument("--work", default="/tmp/vlp-bench-degla")
    args = parser.parse_args()
    work = Path(args.work)
    shards = demo_shards(args.pairs)
    base = Path(args.base) if args.base else train_vlp(shards, work / "base", Recipe(steps=args.base_samples // 128),
                                                        extra=("train.seed=100",)).weights
    if base.is_dir():  # a checkpoint folder: its open_clip weights
        base = base / "model.safetensors"
    tune = rule_shards(shards)
    recipe = Recipe(steps=args.samples // 128, lr=args.lr, warmup=10)
    arms = {"A: contrastive fine-tuning": (), "B: + DeGLA's terms": DEGLA}
    reports: dict[str, list] = {"base": [evaluate(base, recipe.model, work / "base-eval")]}
    for seed in range(args.seeds):
        for arm, extra in arms.items():
            out = work / f"{arm[0]}-seed{seed}"
            run = train_vlp(tune, out, recipe, extra=(f"model.pretrained={base}", *extra, f"train.seed={seed}"))
            reports.setdefault(arm, []).append(evaluate(run.weights, recipe.model, out / "eval"))
            print(f"  {arm}, seed {seed}: {run.seconds:.0f} s", flush=True)

    def mean(arm: str, task: str, metric: str) -> float:
        return 100 * sum(r["tasks"][task]["metrics"][metric] for r in reports[arm]) / len(reports[arm])

    a, b = arms
    rows = [[column, f"{mean('base', t, m):.1f}", f"{mean(a, t, m):.1f}", f"{mean(b, t, m):.1f}",
             f"{mean(b, t, m) - mean(a, t, m):+.1f}"] for column, t, m in METRICS]
    table = {"title": f"DeGLA-style fine-tuning A/B: vlp-tiny-rn, {args.samples} samples from the trained base at lr "
                      f"{args.lr}, rule-made negatives from the demo's captions, mean of {args.seeds} seed(s), default "
                      "suite (%)", "columns": ["metric", "base", a, b, "B - A"], "rows": rows}
    print(markdown(table))
    write_result("degla", "DeGLA-style compositional fine-tuning, A/B", [table], order=64)


if __name__ == "__main__":
    main()
