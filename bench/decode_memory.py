"""Peak memory of a shard build fed huge images: decode memory is bounded per worker.

    python bench/decode_memory.py [--n 8] [--side 9000] [--threads 8] [--workers 2] [--mode RGB]

Writes N PNGs of SIDE x SIDE (81 Mpx at 9000, under the 89.5 Mpx decompression-bomb
limit; a flat colour with a few lines, so each file is small while its pixels are not),
builds shards from them with `vlp shards build --threads T --workers W`, samples the
resident memory of the build's whole process tree every 20 ms, and prints the peak sum
and the peak of the largest process. The decode budget (vlp.core.images) lets one
process hold at most DECODE_BUDGET_PIXELS of full-size pixels at once, so the peak is
about W images, not W x T.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from PIL import Image, ImageDraw

from vlp.core.images import DECODE_BUDGET_PIXELS

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from baselines import write_result  # noqa: E402


def make_pngs(folder: Path, n: int, side: int, mode: str) -> list[Path]:
    paths = []
    for i in range(n):
        img = Image.new(mode, (side, side), (40 * i % 255, 90, 160, 200)[: len(mode)])
        draw = ImageDraw.Draw(img)
        for k in range(0, side, side // 16):  # a few lines: still compresses to a few hundred KB
            draw.line((0, k, side, side - k), fill=(255, 255, 255, 255)[: len(mode)], width=3)
        path = folder / f"huge{i}.png"
        img.save(path, compress_level=9)
        paths.append(path)
    return paths


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(sum, max) resident bytes over a process and its descendants."""
    sizes = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            sizes.append(p.memory_info().rss)
        except psutil.Error:  # exited between listing and reading
            pass
    return sum(sizes), max(sizes, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--side", type=int, default=9000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mode", choices=["RGB", "RGBA", "L"], default="RGB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vlp-decode-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        paths = make_pngs(root, args.n, args.side, args.mode)
        sizes = [p.stat().st_size for p in paths]
        print(f"{args.n} PNGs of {args.side}x{args.side} {args.mode} ({args.side ** 2 / 1e6:.0f} Mpx each, "
              f"{min(sizes) // 1024}-{max(sizes) // 1024} KB) made in {time.perf_counter() - start:.0f} s")
        with open(root / "pairs.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["url", "caption"])
            writer.writerows([[str(p), f"huge image {i}"] for i, p in enumerate(paths)])
        cmd = [sys.executable, "-m", "vlp", "shards", "build", str(root / "pairs.csv"), "--output",
               str(root / "shards"), "--threads", str(args.threads), "--workers", str(args.workers),
               "--shard-size", str(max(1, args.n // max(1, args.workers))), "--quiet"]  # every worker busy
        start = time.perf_counter()
        proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peak_sum = peak_one = 0
        while proc.poll() is None:
            total, largest = tree_rss(proc)
            peak_sum, peak_one = max(peak_sum, total), max(peak_one, largest)
            time.sleep(0.02)
        output = proc.stdout.read().strip().splitlines()
        took = time.perf_counter() - start
    print(f"build: --threads {args.threads} --workers {args.workers}, exit {proc.returncode}, {took:.0f} s; "
          f"last line: {output[-1] if output else ''}")
    print(f"decode budget per process: {DECODE_BUDGET_PIXELS / 1e6:.0f} Mpx")
    print(f"peak RSS, whole process tree: {peak_sum / 2**30:.2f} GiB; largest single process: "
          f"{peak_one / 2**30:.2f} GiB")
    write_result(f"decode_memory_{args.mode.lower()}", f"Decode memory: huge {args.mode} images through the builder", [{
        "columns": ["images", "mode", "threads", "workers", "exit", "seconds", "peak RSS tree GiB",
                    "largest process GiB", "budget per process Mpx"],
        "rows": [[f"{args.n} x {args.side}x{args.side}", args.mode, args.threads, args.workers, proc.returncode,
                  f"{took:.0f}", f"{peak_sum / 2**30:.2f}", f"{peak_one / 2**30:.2f}",
                  f"{DECODE_BUDGET_PIXELS / 1e6:.0f}"]]}], order=70)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
