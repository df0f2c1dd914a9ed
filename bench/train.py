"""Training throughput: `vlp train` vs open_clip_train, each with its own defaults, in one run.

    python bench/train.py [--models vlp-tiny,vlp-tiny-rn] [--sizes 64,224] [--workers 1,2] [--steps 40]
                          [--compile] [--no-cache] [--precision fp32] [--peak-tflops T] [--repeat N]

Both tools train the same open_clip model from scratch on the same synthetic shards (built
here if missing), with the same batch, steps, loader workers, AdamW settings and precision,
one process each, one after the other (`--repeat N`: N runs each, taking turns, and their
medians). Everything else is each tool's default: vlp as a user gets it (its exact speed-ups on
where they are exact for the model), open_clip_train as its users get it. At 224 px the models are the small configs with their image towers at 224 px
(the ViT with 16 px patches: 196 tokens). Reported per setting:

- samples/s: the median of the per-step rate each tool reports (data wait included), after
  the first 5 steps;
- first step: seconds from launching the command to the end of its first step (start-up:
  imports, DeepSpeed and the process group, model, loader workers, the first batch).
`--ceiling`: instead, the model alone: forward, backward and AdamW on random tensors already in
memory (no loader, no trainer), with open_clip's plain modules and with vlp's exact speed-ups,
the rate each tool's training step could reach with a free loader, and the fast step's GFLOP/s
against this machine's rate on one large matrix product (how much of the step is arithmetic the
hardware already runs near its limit).
`--compile`: also vlp with `train.compile` against open_clip_train `--torchcompile` (compiling
takes minutes on a CPU). `--cache`: also a 4x batch by gradient caching (vlp, chunks of the
batch) against open_clip_train's `--accum-freq 4`. Model FLOPs utilisation (MFU) is printed
when the peak is known (on a GPU from its name, or --peak-tflops); model FLOPs per pair are
counted by torch on one forward and tripled for the backward. On a GPU:
`python bench/train.py --models ViT-B-16 --sizes 224 --precision bf16 --batch 256`.
Writes bench/results/train.json (bench/results/train_<suffix>.json with --name).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from baselines import Recipe, markdown, synthetic_shards, train_open_clip, train_vlp, write_result  # noqa: E402

# dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by device-name substring
GPU_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.5, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def peak_tflops(precision: str, given: float | None) -> float | None:
    import torch

    if given is not None:
        return given
    if precision == "fp32" or not torch.cuda.is_available():
        return None  # no meaningful tensor-core peak: MFU not printed
    name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in GPU_PEAK_TFLOPS.items() if key in name), None)


def model_flops_per_pair(model_name: str, config_file: Path | None) -> float:
    """Training FLOPs for one image-text pair: forward (counted by torch, attention as plain matrix
    products, which the counter knows on every device) x 3."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from vlp.core.config import ModelConfig
    from vlp.core.models import create_model, encode

    cfg = ModelConfig(name=model_name, config_file=str(config_file) if config_file else None)
    model, _, _, tokenizer = create_model(cfg)
    size = model.visual.image_size
    size = size if isinstance(size, tuple | list) else (size, size)
    images = torch.zeros(2, 3, *size)
    texts = tokenizer(["a red circle", "two blue squares"])
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        encode(model, images, texts)
    return 3 * counter.get_total_flops() / 2


def model_step(model_name: str, config_file: Path | None, batch: int, speedups: bool):
    """(step, FLOPs per sample): `step()` runs the model's training step alone on random tensors
    (forward, loss, backward, AdamW) and returns its seconds. The FLOPs are the step's forward and
    backward as torch counts them, with the text as the step sees it (trimmed with the speed-ups)."""
    import time

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from vlp.core.config import ModelConfig
    from vlp.core.models import create_model, forward
    from vlp.train import speedups as fast

    torch.manual_seed(0)
    model, _, _, tokenizer = create_model(ModelConfig(name=model_name, config_file=str(config_file) if config_file
                                                      else None))
    size = model.visual.image_size
    size = size if isinstance(size, tuple | list) else (size, size)
    images = torch.randn(batch, 3, *size)
    texts = tokenizer(["a photo of three small red circles"] * batch)
    labels = torch.arange(batch)

    def loss() -> torch.Tensor:
        out = forward(model, images, texts)
        logits = out.logit_scale * out.image @ out.text.T
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    if speedups:
        fast.allow_trimmed_text(model, model_name)
        fast.use_direct_attention(model)
        texts = fast.trim_tokens(texts)[0]
        if fast._convolutional(model):
            fast.use_channels_last(model)
            images = images.contiguous(memory_format=torch.channels_last)
    # counted with attention as plain matrix products: torch's counter has no rule for the fused CPU
    # attention kernels, which do the same arithmetic
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss().backward()
    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> float:
        start = time.perf_counter()
        value = loss()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step, counter.get_total_flops() / batch


def matrix_product(n: int = 2048):
    """`product()` times one fp32 n x n matrix product (torch's threads) and returns its GFLOP/s: the
    most a training step made of matrix products can reach on this machine."""
    import time

    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)

    def product() -> float:
        start = time.perf_counter()
        a @ b
        return 2 * n**3 / (time.perf_counter() - start) / 1e9

    return product


def interleaved_medians(timers: list, rounds: int, warmup: int = 3) -> list[float]:
    """The median of each timer's result over `rounds`, the timers taking turns, so that a slow
    spell of a shared machine falls on all of them alike rather than on whichever ran then."""
    results = [[] for _ in timers]
    for i in range(warmup + rounds):
        for kept, timer in zip(results, timers, strict=True):
            value = timer()
            if i >= warmup:
                kept.append(value)
    return [statistics.median(kept) for kept in results]


def ceiling(args, work: Path) -> None:
    """The model-alone table (--ceiling)."""
    rows, product = [], matrix_product()
    for model in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            name, config = model_at(model, size, work)
            batch = args.batch or (128 if size <= 64 else 64)
            (plain_step, _), (fast_step, flops) = (model_step(name, config, batch, on) for on in (False, True))
            plain_s, fast_s, peak = interleaved_medians([plain_step, fast_step, product], rounds=10)
            plain, fast = batch / plain_s, batch / fast_s
            rate = fast * flops / 1e9
            rows.append([model, size, batch, f"{plain:.1f}", f"{fast:.1f}", f"{fast / plain:.2f}x", f"{rate:.1f}",
                         f"{peak:.1f}", f"{100 * rate / peak:.0f}%"])
            print("  " + " | ".join(str(c) for c in rows[-1]), flush=True)
    table = {"title": "fp32, one process; samples/s: median of 10 steps after 3, random tensors in memory, "
                      "the plain step, the fast one and a 2048x2048 matrix product taking turns",
             "columns": ["model", "image px", "batch", "plain model alone samples/s",
                         "with vlp's exact speed-ups samples/s", "ratio", "with speed-ups GFLOP/s",
                         "matrix product GFLOP/s", "of the matrix-product rate"], "rows": rows}
    print(markdown(table))
    write_result("train_ceiling", "Training step of the model alone: the rate a free loader would allow",
                 [table], order=16)


def model_at(model: str, size: int, work: Path) -> tuple[str, Path | None]:
    """(name, config file) of `model` with its image tower at `size` px (None: the shipped config as it is)."""
    from vlp.core.models import model_config

    cfg = json.loads(json.dumps(model_config(model)))
    if cfg["vision_cfg"]["image_size"] == size:
        return model, None
    cfg["vision_cfg"]["image_size"] = size
    if "patch_size" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["patch_size"] = 16  # 196 tokens at 224 px, as ViT-B/16
    path = work / "models" / f"{model}-{size}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return path.stem, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vlp-tiny,vlp-tiny-rn")
    parser.add_argument("--sizes", default="64,224")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=0, help="default: 128 at 64 px, 64 at 224 px")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="also train.compile vs --torchcompile")
    parser.add_argument("--ceiling", action="store_true", help="the model alone, without loader or trainer")
    parser.add_argument("--cache", action="store_true", help="also a 4x batch by gradient caching vs --accum-freq 4")
    parser.add_argument("--peak-tflops", type=float, help="the accelerator's peak, for MFU (default: from the GPU)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool and setting, the tools taking turns")
    parser.add_argument("--name", default="", help="result file bench/results/train[_NAME].json")
    parser.add_argument("--work", default="/tmp/vlp-bench-train")
    args = parser.parse_args()
    work = Path(args.work)
    if args.ceiling:
        return ceiling(args, work)
    peak = peak_tflops(args.precision, args.peak_tflops)
    rows, runs = [], []
    for model in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            name, config = model_at(model, size, work)
            shards = synthetic_shards(work, image_size=max(64, size + size // 8))
            batch = args.batch or (128 if size <= 64 else 64)
            flops = model_flops_per_pair(name, config)
            for workers in (int(w) for w in args.workers.split(",")):
                r = Recipe(model=name, batch=batch, steps=args.steps, workers=workers, precision=args.precision,
                           lr=1e-3, warmup=10, grad_clip=None)
                pairs = [("default", (), {})]
                if args.compile:
                    pairs.append(("compiled", ("train.compile=true",), {"compile": True}))
                if args.cache:
                    pairs.append(("4x batch, cached", (), {"accum": 4}))
                for label, vlp_extra, oc_extra in pairs:
                    accum = oc_extra.get("accum", 1)
                    rounds = []
                    for _ in range(args.repeat):  # the tools take turns: a slow spell lands on both
                        oc = train_open_clip(shards, work / "open_clip", r, config=config, **oc_extra)
                        ours = train_vlp(shards, work / "vlp", r, config=config, extra=vlp_extra,
                                         batch=batch * accum if accum > 1 else None,
                                         micro=batch if accum > 1 else None)
                        rounds.append((ours, oc))
                        runs.append({"model": model, "image_px": size, "batch": batch * accum, "workers": workers,
                                     "label": label, "vlp": vars(ours) | {"weights": None},
                                     "open_clip_train": vars(oc) | {"weights": None}})
                    ours_s, oc_s, ours_first, oc_first = (
                        statistics.median(getattr(pair[i], key) for pair in rounds)
                        for key in ("samples_per_s", "first_step_s") for i in (0, 1))
                    ratios = sorted(o.samples_per_s / c.samples_per_s for o, c in rounds)
                    spread = f" ({ratios[0]:.2f}-{ratios[-1]:.2f}x)" if len(ratios) > 1 else ""
                    mfu = [f"{100 * rate * flops / (peak * 1e12):.1f}%" if peak else "n/a" for rate in (ours_s, oc_s)]
                    row = [model, size, batch * accum, workers, label, f"{ours_s:.1f}", f"{oc_s:.1f}",
                           f"{ours_s / oc_s:.2f}x{spread}", f"{ours_first:.1f}", f"{oc_first:.1f}", *mfu]
                    rows.append(row)
                    print("  " + " | ".join(str(c) for c in row), flush=True)
    table = {"title": f"{args.precision}, {args.steps} steps, one process; samples/s: median after 5 steps"
                      + (f", then the median of {args.repeat} runs per tool taking turns (ratio: of the medians, "
                         "and the range of the runs' ratios)" if args.repeat > 1 else "")
                      + "; first step: seconds from launch to the end of step 1",
             "columns": ["model", "image px", "batch", "loader workers", "setting", "vlp samples/s",
                         "open_clip_train samples/s", "ratio", "vlp first step s", "open_clip_train first step s",
                         "vlp MFU", "open_clip_train MFU"], "rows": rows}
    print(markdown(table))
    write_result("train" + (f"_{args.name}" if args.name else ""), "Training throughput: vlp vs open_clip_train, "
                 "each with its defaults", [table], order=15, runs=runs)
    shutil.rmtree(work / "vlp", ignore_errors=True)


if __name__ == "__main__":
    main()
