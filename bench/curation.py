"""Curation, measured: planted defects found, embed speed, and curate's time and memory at scale.

    python bench/curation.py --model runs/demo [--n 4000] [--ab]

1. Plants defects into N synthetic pairs (vlp.data_tools.curation.planted: 20%
   captions swapped, 5% near-duplicates by a 1-4% crop + JPEG, 50 images of
   the default eval suite), builds shards, embeds them with --model (a trained
   run: `vlp demo` makes runs/demo) and curates three ways (CLIP-score cut
   alone; with decontamination against the default suite and SemDeDup on
   embeddings alone; the same confirmed by perceptual hashes); prints what
   fraction of each defect was removed and of good pairs with them.
2. With --ab: trains the same recipe on the raw and on the curated shards for
   the same number of samples and evaluates both on the default suite.

    python bench/curation.py --scale 100000,1000000 [--dim 512]

times curate's decisions (exact dedup, SemDeDup with faiss k-means, the global
top-fraction cut) on random embeddings of that many samples, and prints the
peak memory of the process.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from baselines import markdown, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def vlp(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "vlp", *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"vlp {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def planted(args) -> None:
    from vlp.data_tools.curation.planted import plant, score

    work = Path(args.work)
    pairs = work / "pairs"
    if not (pairs / "truth.json").exists():
        plant(pairs, args.n, seed=1, image_size=64, mismatched=0.2, near_duplicates=args.n // 20, eval_images=50)
    vlp("shards", "build", str(pairs / "pairs.csv"), "--output", str(work / "shards"), "--image-size", "64",
        "--resize-mode", "no", "--shard-size", "1000", "--overwrite", "--quiet")
    start = time.perf_counter()
    printed = vlp("shards", "embed", str(work / "shards"), "--out", str(work / "emb"), "--model", args.model, "--quiet")
    seconds = time.perf_counter() - start
    print(printed.strip())
    samples = int(printed.split("(", 1)[1].split()[0])
    if samples:  # 0 when an earlier run embedded everything already
        print(f"embed: {samples} samples in {seconds:.1f}s = {samples / seconds:.0f} samples/s (incl. start-up; CPU)")
    rows = []
    hashes = ["--decontaminate-hash-distance", "2", "--semdedup-hash-distance", "10"]
    for name, extra in [("CLIP top 80% only", ["--clip-score-top", "0.8"]),
                        ("decontaminate + SemDeDup 0.9 (embeddings only) + CLIP top 80%",
                         ["--decontaminate-suite", "default", "--semdedup-threshold", "0.9", "--clip-score-top", "0.8"]),
                        ("decontaminate + SemDeDup 0.9, both with pHash + CLIP top 80%",
                         ["--decontaminate-suite", "default", "--semdedup-threshold", "0.9", *hashes,
                          "--clip-score-top", "0.8"])]:
        out = work / "curated"
        start = time.perf_counter()
        printed = vlp("shards", "curate", str(work / "shards"), "--output", str(out), "--embeddings",
                      str(work / "emb"), *extra, "--overwrite", "--quiet")
        print(printed.strip(), f"({time.perf_counter() - start:.1f}s)")
        rows.append((name, score(pairs, work / "shards", out)))
    counts = rows[0][1]["counts"]
    table = {"title": f"planted defects in {args.n} synthetic pairs (+ {counts['near_duplicate_pairs']} "
                      f"near-duplicates, {counts['eval']} eval images); model {args.model}",
             "columns": ["curation", "mismatched removed", "good removed", "near-duplicates removed",
                         "eval images removed"],
             "rows": [[name, f"{s['mismatched_removed']:.1%}", f"{s['good_removed']:.1%}",
                       f"{s['near_duplicates_removed']:.1%}", f"{s['eval_removed']:.1%}"] for name, s in rows]}
    print(markdown(table))
    tables = [table, *([ab(work, args)] if args.ab else [])]
    write_result("curation_planted", "Curation on planted defects (synthetic set)", tables, order=40)


def ab(work: Path, args) -> dict:
    """The same recipe on raw and curated shards, the same samples seen, then the default suite."""
    vlp("shards", "curate", str(work / "shards"), "--output", str(work / "curated"), "--embeddings", str(work / "emb"),
        "--decontaminate-suite", "default", "--decontaminate-hash-distance", "2", "--semdedup-threshold", "0.9",
        "--semdedup-hash-distance", "10", "--clip-score-top", "0.8", "--overwrite", "--quiet")
    results = {}
    for name in ("raw", "curated"):
        run = work / f"run-{name}"
        vlp("train", "--config", "demo", f"data.sources=[{{shards: '{work / ('shards' if name == 'raw' else 'curated')}'}}]",
            f"train.output_dir={run}", f"train.samples={args.ab_samples}", "data.shuffle_buffer=1000")
        vlp("eval", "--model", str(run), "--suite", "default", "--out", str(work / f"eval-{name}"), "--quiet")
        results[name] = json.loads((work / f"eval-{name}" / "report.json").read_text())["summary"]
    table = {"title": f"A/B at {args.ab_samples} samples seen (demo recipe, vlp-tiny-rn), default suite",
             "columns": ["task", "metric", "raw", "curated"],
             "rows": [[task, r["metric"], f"{100 * r['value']:.1f}", f"{100 * results['curated'][task]['value']:.1f}"]
                      for task, r in results["raw"].items()]}
    print(markdown(table))
    return table


def scale(args) -> None:
    """curate's decisions on random embeddings: time per step and the process's peak memory."""
    from vlp.data_tools.curation import dedup

    rows = []
    for n in (int(v) for v in args.scale.split(",")):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, args.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        near = rng.choice(n, size=n // 20, replace=False)  # 5% near-duplicates of another sample
        x[near] = x[(near + 1) % n] + 0.01 * rng.standard_normal((len(near), args.dim), dtype=np.float32)
        x[near] /= np.linalg.norm(x[near], axis=1, keepdims=True)
        scores = rng.random(n, dtype=np.float32)
        sha = pa.array([f"{i % (n - n // 100):064x}" for i in range(n)]).to_pylist()  # 1% exact copies
        t = {}
        start = time.perf_counter()
        exact = dedup.exact_duplicates(sha, np.ones(n, bool))
        t["exact dedup"] = time.perf_counter() - start
        start = time.perf_counter()
        semantic = dedup.semantic_duplicates(x, scores, 0.95, max(1, n // 1000))
        t["SemDeDup (k-means + pairs)"] = time.perf_counter() - start
        start = time.perf_counter()
        threshold = np.sort(scores)[::-1][int(0.3 * n) - 1]
        t["CLIP top 30% (global)"] = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\n{n} samples, dim {args.dim}: exact {len(exact)}, semantic {len(semantic)} removed "
              f"(planted {len(near)}), CLIP threshold {threshold:.3f}; peak RSS so far {peak:.0f} MiB "
              f"(embeddings {x.nbytes / 2**20:.0f} MiB)")
        for step, seconds in t.items():
            print(f"  {step}: {seconds:.1f}s ({n / max(seconds, 1e-9):.0f} samples/s)")
            rows.append([n, step, f"{seconds:.1f}", f"{n / max(seconds, 1e-9):.0f}", f"{peak:.0f}"])
    write_result("curation_scale", "Curation's decisions at scale (random embeddings)", [{
        "columns": ["samples", "step", "seconds", "samples/s", "peak RSS so far, MiB"], "rows": rows}], order=45,
        about=f"dim {args.dim}; 5% planted near-duplicates, 1% exact copies")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="runs/demo", help="a trained run or exported model (vlp demo: runs/demo)")
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--work", default="/tmp/vlp-bench-curation")
    parser.add_argument("--ab", action="store_true", help="also train on raw vs curated and evaluate both")
    parser.add_argument("--ab-samples", type=int, default=96000)
    parser.add_argument("--scale", help="comma-separated sample counts: time curate's decisions on random embeddings")
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    if args.scale:
        return scale(args)
    planted(args)


if __name__ == "__main__":
    main()
