"""Training throughput: `vlp train` vs open_clip_train on the same model, shards and batch, in one run.

    python bench/train.py [--steps 40] [--batch 128] [--model vlp-tiny] [--precision fp32]

Both train the same open_clip model config from scratch on the same shards
(the synthetic default, built here if missing) with the same batch size,
number of steps, data workers, AdamW settings and precision, in one process.
Throughput is the median of the per-step samples/s each tool reports (data
wait included), skipping the first 5 steps (start-up, allocator warm-up).
vlp runs three ways: as it is by default, with the step speed-ups that keep
the numbers (train.trim_text, train.direct_attention; train.channels_last for conv towers), and with
train.compile on top, against open_clip_train --torchcompile. Then the same at
4x the contrastive batch through gradient caching (vlp: batch 4B in chunks of
B; open_clip_train: --accum-freq 4 at batch B, its own feature-caching
accumulation). Last, a profile of where one vlp step's time goes.

Model FLOPs utilisation (MFU) is printed when the peak is known: on a GPU
from its name (dense bf16/fp16 tensor-core peak), or given by --peak-tflops.
Model FLOPs per pair are counted by torch (FlopCounterMode) on one forward of
image and text and tripled for the backward; the re-forward of gradient
caching is not counted, as MFU counts the work the model needs, not the work
done. On a GPU cluster: `python bench/train.py --model ViT-B-16 --precision bf16 --batch 256`.

open_clip_train runs from its own virtualenv (bench/baselines.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from baselines import Recipe, ensure_synthetic_shards, train_open_clip, train_vlp  # noqa: E402

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


def model_flops_per_pair(model_name: str) -> float:
    """Training FLOPs for one image-text pair: forward (counted by torch) x 3."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vlp.core.config import ModelConfig
    from vlp.core.models import create_model, encode

    model, _, _, tokenizer = create_model(ModelConfig(name=model_name))
    size = model.visual.image_size
    size = size if isinstance(size, tuple | list) else (size, size)
    images = torch.zeros(2, 3, *size)
    texts = tokenizer(["a red circle", "two blue squares"])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encode(model, images, texts)
    return 3 * counter.get_total_flops() / 2


def profile_vlp_step(shards: Path, out: Path, r: Recipe) -> list[tuple[str, float]]:
    """Time the parts of vlp steps in-process: data wait, gradient-cached forward/backward, optimizer."""
    import torch

    from vlp.core.config import load_config
    from vlp.train.trainer import Trainer

    cfg = load_config(None, [f"data.sources=[{{shards: '{shards}'}}]", f"data.workers={r.workers}",
                             f"model.name={r.model}", f"train.batch_size={r.batch}", "train.steps=1000",
                             f"train.output_dir={out}", f"train.precision={r.precision}"])
    trainer = Trainer(cfg)
    stream = trainer.loader.stream()
    parts = {"data wait": 0.0, "forward + backward (GradCache.step)": 0.0, "optimizer (engine.step)": 0.0}
    steps = 12
    for i in range(steps):
        t0 = time.perf_counter()
        batch = next(stream)
        t1 = time.perf_counter()
        trainer.gradcache.step(batch.images, batch.texts.to(trainer.device))
        t2 = time.perf_counter()
        trainer.engine.step()
        t3 = time.perf_counter()
        if i >= 2:  # skip warm-up
            parts["data wait"] += t1 - t0
            parts["forward + backward (GradCache.step)"] += t2 - t1
            parts["optimizer (engine.step)"] += t3 - t2
    batch = next(stream)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.gradcache.step(batch.images, batch.texts)
        trainer.engine.step()
    print("\ntop operators of one step (torch.profiler, CPU time):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    return [(name, seconds / (steps - 2)) for name, seconds in parts.items()]


def speedups(model: str) -> tuple[str, ...]:
    """The step speed-ups that keep the numbers, as overrides: channels-last only helps conv towers."""
    from vlp.core.models import model_config

    conv = "layers" in (model_config(model) or {}).get("vision_cfg", {}) and isinstance(
        model_config(model)["vision_cfg"]["layers"], list)  # ModifiedResNet: a list of stage depths
    return ("train.trim_text=true", "train.direct_attention=true", *(["train.channels_last=true"] if conv else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="vlp-tiny")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--work", default="/tmp/vlp-bench-train")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled pair (compiling takes minutes on a CPU)")
    parser.add_argument("--peak-tflops", type=float, help="the accelerator's peak, for MFU (default: from the GPU)")
    args = parser.parse_args()
    work = Path(args.work)
    shards = ensure_synthetic_shards(work)
    r = Recipe(model=args.model, batch=args.batch, steps=args.steps, workers=args.workers,
               precision=args.precision, lr=1e-3, warmup=10)
    fast = speedups(args.model)
    rows = []
    oc = train_open_clip(shards, work / "open_clip", r)
    for label, extra in [(f"batch {args.batch}", ()), (f"batch {args.batch}, speed-ups: {' '.join(fast)}", fast)]:
        ours = train_vlp(shards, work / "vlp", r, extra=extra)
        rows.append((label, ours.samples_per_s, oc.samples_per_s))
        print(f"  {label}: vlp {ours.samples_per_s:.1f}/s, open_clip_train {oc.samples_per_s:.1f}/s", flush=True)
    if not args.no_compile:
        label = f"batch {args.batch}, compiled: vlp speed-ups + train.compile vs open_clip_train --torchcompile"
        oc_compiled = train_open_clip(shards, work / "open_clip", r, compile=True)
        ours = train_vlp(shards, work / "vlp", r, extra=(*fast, "train.compile=true"))
        rows.append((label, ours.samples_per_s, oc_compiled.samples_per_s))
        print(f"  {label}: vlp {ours.samples_per_s:.1f}/s, open_clip_train {oc_compiled.samples_per_s:.1f}/s",
              flush=True)
    label = f"batch {4 * args.batch} via gradient caching (chunks of {args.batch}), speed-ups"
    oc = train_open_clip(shards, work / "open_clip", r, accum=4)
    ours = train_vlp(shards, work / "vlp", r, batch=args.batch * 4, micro=args.batch, extra=fast)
    rows.append((label, ours.samples_per_s, oc.samples_per_s))
    print(f"  {label}: vlp {ours.samples_per_s:.1f}/s, open_clip_train {oc.samples_per_s:.1f}/s", flush=True)
    print(f"\ntraining throughput, {args.model}, {args.precision}, {args.steps} steps, {args.workers} data workers, "
          "1 process (median samples/s after 5 steps)")
    flops = model_flops_per_pair(args.model)
    peak = peak_tflops(args.precision, args.peak_tflops)
    print(f"model FLOPs per pair (forward + backward): {flops / 1e9:.2f} GFLOP; peak: "
          + (f"{peak:.1f} TFLOP/s" if peak else "unknown (MFU not shown; --peak-tflops)"))
    print("| contrastive batch | vlp train samples/s | open_clip_train samples/s | ratio | vlp MFU | open_clip_train MFU |")
    print("|---|---|---|---|---|---|")
    for label, ours, oc in rows:
        mfu = [f"{100 * sps * flops / (peak * 1e12):.1f}%" if peak else "n/a" for sps in (ours, oc)]
        print(f"| {label} | {ours:.1f} | {oc:.1f} | {ours / oc:.2f}x | {mfu[0]} | {mfu[1]} |")
    if not args.no_profile:
        parts = profile_vlp_step(shards, work / "profile", r)
        total = sum(s for _, s in parts)
        print(f"\nwhere one vlp step goes (batch {args.batch}, mean of 10 steps, {total * 1000:.0f} ms):")
        print("| part | ms | share |")
        print("|---|---|---|")
        for name, seconds in parts:
            print(f"| {name} | {seconds * 1000:.0f} | {100 * seconds / total:.0f}% |")


if __name__ == "__main__":
    main()
