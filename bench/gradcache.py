"""Gradient caching: peak memory and time per sample versus effective batch, with and without caching.

    python bench/gradcache.py [--model vlp-tiny] [--chunk 128] [--batches 256 512 1024 2048 4096]

Each (batch, mode) runs in a fresh child process, so its peak RSS (getrusage ru_maxrss)
is that configuration's alone: torch's CPU allocations are invisible to tracemalloc.
One process, fp32, CPU, all cores; the optimizer step is left out (it is the same per
step with or without caching). Images are held as uint8 and normalised per chunk
(GradCache's normalize_images), as the trainer does on the device; the
"input MB" column is the uint8 batch. Time per sample is the fastest of --repeats rounds
(the machine may be shared). Without caching the whole batch goes through one
forward/backward; those runs are skipped once the peak predicted from the smaller ones
passes --max-rss-gb.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from baselines import write_result  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> None:
    """Build the model, run a warm-up step and timed steps, print one JSON line."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from vlp.core.config import LossConfig, ModelConfig
    from vlp.core.models import create_model, image_normalization
    from vlp.train.gradcache import GradCache
    from vlp.train.loader.batches import normalize
    from vlp.train.losses import ContrastiveLoss

    torch.manual_seed(0)
    model, *_ = create_model(ModelConfig(name=args.model), LossConfig())
    model.train()
    size, ctx = model.visual.image_size, model.context_length
    mean, std = image_normalization(model)
    chunk = args.chunk if args.mode == "cache" else None
    gc = GradCache(model, ContrastiveLoss("softmax"), chunk, normalize_images=partial(normalize, mean=mean, std=std))

    def data(n: int):
        g = torch.Generator().manual_seed(n)
        return torch.randint(0, 256, (n, 3, *size), generator=g, dtype=torch.uint8), torch.randint(
            1, 49407, (n, ctx), generator=g
        )

    warm = 2 * args.chunk if args.mode == "cache" else args.batch  # no-cache: warm the full-size allocations
    gc.step(*data(warm))
    model.zero_grad(set_to_none=True)
    images, texts = data(args.batch)
    steps = max(1, args.samples // args.batch)
    walls, cpus = [], []
    for _ in range(args.repeats):  # fastest round: the machine may be shared, interference only adds time
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            gc.step(images, texts)
            model.zero_grad(set_to_none=True)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    n = steps * args.batch
    print(
        json.dumps(
            {
                "ms_per_sample": 1000 * min(walls) / n,
                "cpu_ms_per_sample": 1000 * min(cpus) / n,
                "peak_mb": peak_rss_mb(),
                "input_mb": (images.numel() + texts.numel() * texts.element_size()) / 2**20,
                "steps": steps,
            }
        )
    )


def run(args: argparse.Namespace, batch: int, mode: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--mode", mode, "--batch", str(batch)]
    cmd += ["--chunk", str(args.chunk), "--model", args.model, "--samples", str(args.samples)]
    cmd += ["--repeats", str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def predicted_peak_mb(history: list[tuple[int, float]], batch: int) -> float | None:
    """Linear extrapolation of peak RSS from the two largest measured batches."""
    if len(history) < 2:
        return None
    (b0, m0), (b1, m1) = history[-2], history[-1]
    return m1 + (m1 - m0) / (b1 - b0) * (batch - b1)


def _row(batch: int, mode: str, rows: dict, base_peak: float | None, widths: list[int]) -> str:
    """One table line; ratios only on cache rows."""
    r, ref = rows[mode], rows["nocache"]
    if "peak_mb" not in r:
        return f"{batch:>{widths[0]}} | {mode:>{widths[1]}} | {r.get('skip') or 'failed: ' + r['error']}"
    ratio = mode == "cache" and "ms_per_sample" in ref
    cells = [
        str(batch),
        mode,
        f"{r['peak_mb']:.0f}",
        f"{r['input_mb']:.1f}",
        f"{r['ms_per_sample']:.2f}",
        f"{r['cpu_ms_per_sample']:.2f}",
        f"{r['ms_per_sample'] / ref['ms_per_sample']:.2f}x" if ratio else "",
        f"{r['cpu_ms_per_sample'] / ref['cpu_ms_per_sample']:.2f}x" if ratio else "",
        f"{r['peak_mb'] / base_peak:.3f}x" if mode == "cache" and base_peak else "",
    ]
    return " | ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vlp-tiny")
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument(
        "--samples", type=int, default=1024, help="timed samples per configuration (at least one step)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timing rounds; the fastest is reported")
    p.add_argument("--max-rss-gb", type=float, default=8.0, help="skip no-cache runs predicted to need more")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["cache", "nocache"], help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    print(f"model {args.model}, fp32, CPU ({os.cpu_count()} cores), chunk {args.chunk}, softmax loss")
    cols = ["batch", "mode", "peak RSS MB", "input MB", "wall ms/sample", "cpu ms/sample", "wall vs no-cache"]
    cols += ["cpu vs no-cache", f"peak vs cache@{args.batches[0]}"]
    head = " | ".join(f"{c:>{max(6, len(c))}}" for c in cols)
    widths = [max(6, len(c)) for c in cols]
    print(head)
    print("-" * len(head))
    base_peak = None
    nocache_hist: list[tuple[int, float]] = []
    table_rows: list[list[str]] = []
    t_start = time.time()
    for batch in args.batches:
        rows = {}
        for mode in ("nocache", "cache"):
            guess = predicted_peak_mb(nocache_hist, batch) if mode == "nocache" else None
            if guess is not None and guess > args.max_rss_gb * 1024:
                rows[mode] = {
                    "skip": f"skipped (predicted peak {guess / 1024:.1f} GB > --max-rss-gb {args.max_rss_gb})"
                }
                continue
            rows[mode] = run(args, batch, mode)
            if mode == "nocache" and "peak_mb" in rows[mode]:
                nocache_hist.append((batch, rows[mode]["peak_mb"]))
        if base_peak is None and "peak_mb" in rows["cache"]:
            base_peak = rows["cache"]["peak_mb"]
        for mode in ("nocache", "cache"):
            line = _row(batch, mode, rows, base_peak, widths)
            print(line, flush=True)
            table_rows.append([c.strip() for c in line.split(" | ")] + [""] * (len(cols) - len(line.split(" | "))))
    print(f"total {time.time() - t_start:.0f} s")
    write_result("gradcache", "Gradient caching: memory and time against the effective batch",
                 [{"columns": cols, "rows": table_rows}], order=55,
                 about=f"model {args.model}, fp32, chunk {args.chunk}, softmax loss")


if __name__ == "__main__":
    main()
