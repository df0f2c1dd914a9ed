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

    python bench/curation.py --real openmoji

the same planted defects (10% captions swapped, near-duplicates by a 2% crop + JPEG, 50
images of the set's eval suite) in a real image-text set (bench/real_sets.py's), embedded with
a model trained on it, curated at the README's settings and at the earlier pHash ones.

    python bench/curation.py --stream 1000000,10000000 [--dim 512]

writes an embed output of that many random embeddings and runs SemDeDup through cluster
files (cluster_files.py) in a fresh process: its time and peak memory.
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


def _score_rows(scored: list[tuple[str, dict]]) -> list[list[str]]:
    """(curation name, planted.score result) -> the table's rows: each defect's share removed (near-duplicate
    pairs that decontamination took whole, as copies of eval images, counted in brackets)."""
    def near(s: dict) -> str:
        whole = s["near_duplicates_as_eval_copies"]
        return f"{s['near_duplicates_removed']:.1%}" + (f" ({whole} as eval copies)" if whole else "")

    return [[name, f"{s['mismatched_removed']:.1%}", f"{s['good_removed']:.1%}", near(s), f"{s['eval_removed']:.1%}"]
            for name, s in scored]


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
             "rows": _score_rows(rows)}
    print(markdown(table))
    tables = [table, *([ab(work, args)] if args.ab else [])]
    write_result("curation_planted", "Curation on planted defects (synthetic set)", tables, order=40)


REAL_SETTINGS = [  # (name, curate flags; SUITE stands for the set's eval suite)
    ("CLIP top 90% only", ["--clip-score-top", "0.9"]),
    ("decontaminate (defaults) + SemDeDup 0.9 with thumbnails + CLIP top 90%",
     ["--decontaminate-suite", "SUITE", "--semdedup-threshold", "0.9", "--semdedup-copy-distance", "6",
      "--clip-score-top", "0.9"]),
    ("the same, SemDeDup also asking captions alike (0.9)",
     ["--decontaminate-suite", "SUITE", "--semdedup-threshold", "0.9", "--semdedup-copy-distance", "6",
      "--semdedup-caption-threshold", "0.9", "--clip-score-top", "0.9"]),
    ("the same, SemDeDup asking the same caption words instead",
     ["--decontaminate-suite", "SUITE", "--semdedup-threshold", "0.9", "--semdedup-copy-distance", "6",
      "--semdedup-same-caption", "--clip-score-top", "0.9"]),
    ("decontaminate with pHash 2 bits, no thumbnails + SemDeDup 0.9 with pHash 10 + CLIP top 90% (before)",
     ["--decontaminate-suite", "SUITE", "--decontaminate-copy-distance", "none", "--decontaminate-hash-distance", "2",
      "--semdedup-threshold", "0.9", "--semdedup-hash-distance", "10", "--clip-score-top", "0.9"]),
]


def planted_real(args) -> None:
    """The planted-defect bench on a real image-text set (bench/real_sets.py's), with a model trained on it."""
    import csv

    import real_sets
    from vlp.data_tools.curation.planted import plant_rows, score

    sets_work = Path(args.real_work)
    _, suite, _ = real_sets.SETS[args.real](sets_work)
    data = sets_work / ("data" if args.real == "emoji" else "data-openmoji")
    with open(data / "train.csv", newline="") as fh:
        rows = [{"url": r["url"], "caption": r["caption"]} for r in csv.DictReader(fh)]
    work = Path(args.work) / args.real
    pairs = work / "pairs"
    if not (pairs / "truth.json").exists():
        plant_rows(pairs, rows, seed=1, mismatched=0.1, near_duplicates=len(rows) // 10, eval_suite=str(suite),
                   eval_images=50, crop=(0.98, 0.98))
    vlp("shards", "build", str(pairs / "pairs.csv"), "--output", str(work / "shards"), "--image-size", "64",
        "--shard-size", "1000", "--overwrite", "--quiet")
    # the scorer: a model trained on these pairs (swapped captions included, as a crawl's own model would be),
    # or on the other real set (other drawings of the same emoji names: a model that never saw these pairs)
    other = {"emoji": "openmoji", "openmoji": "emoji"}[args.real]
    scorer_shards = real_sets.SETS[other](sets_work)[0] if args.scorer == "other-set" else work / "shards"
    suffix = f"-{other}" if args.scorer == "other-set" else ""
    run, emb = work / f"run{suffix}", work / f"emb{suffix}"
    if not (run / "checkpoints").exists():  # the recipe, as bench/real_sets.py
        vlp("train", "--config", "recipe-small", f"data.sources=[{{shards: '{scorer_shards}'}}]",
            f"train.output_dir={run}", f"train.samples={args.real_samples}")
    vlp("shards", "embed", str(work / "shards"), "--out", str(emb), "--model", str(run), "--quiet")
    results = []
    for name, extra in REAL_SETTINGS:
        out = work / "curated"
        printed = vlp("shards", "curate", str(work / "shards"), "--output", str(out), "--embeddings", str(emb),
                      *[str(suite) if e == "SUITE" else e for e in extra], "--overwrite", "--quiet")
        print(printed.strip())
        results.append((name, score(pairs, work / "shards", out)))
    counts = results[0][1]["counts"]
    table = {"title": f"planted defects in {args.real} ({len(rows)} real pairs; {counts['mismatched']} captions "
                      f"swapped, {counts['near_duplicate_pairs']} near-duplicates by a 2% crop + JPEG, "
                      f"{counts['eval']} eval images; {counts['eval_twins']} pairs already an eval image pixel for "
                      f"pixel, not counted as good); model: vlp-tiny trained on "
                      f"{'the ' + other + ' set' if args.scorer == 'other-set' else 'them'} ({args.real_samples} samples)",
             "columns": ["curation", "swapped removed", "good removed", "near-duplicates removed",
                         "eval copies removed", "eval twins removed", "good removed by"],
             "rows": [[*row, f"{s['eval_twins_removed']:.1%}",
                       ", ".join(f"{k} {v}" for k, v in s["good_removed_by"].items()) or "-"]
                      for row, (_, s) in zip(_score_rows(results), results, strict=True)]}
    print(markdown(table))
    write_result(f"curation_planted_{args.real}{suffix.replace('-', '_scored_by_')}",
                 f"Curation on planted defects ({args.real}, real drawings{', scored by ' + other if suffix else ''})",
                 [table], order=41, about="targets: 100% of eval copies, >= 95% of near-duplicates, >= 90% of "
                 "swapped captions, <= 2% of good pairs lost. Eval twins: clean pairs whose source image is an image of the eval "
                 "suite pixel for pixel (decided on the source files, not by curation's signal). A near-duplicate "
                 "pair counts as removed when one went as the other's duplicate or both went as eval copies.")


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


SHARD_ROWS = 10_000


def _synthetic_embeddings(root: Path, n: int, dim: int) -> None:
    """An embed output of n random image embeddings (5% near-duplicates of a neighbour), written shard by shard."""
    from vlp.data_tools.curation import embeddings

    if (root / "embed.json").exists():
        return
    shards = []
    for shard, start in enumerate(range(0, n, SHARD_ROWS)):
        rng = np.random.default_rng(shard)
        m = min(SHARD_ROWS, n - start)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        near = rng.choice(m - 1, size=m // 20, replace=False)
        x[near] = x[near + 1] + 0.01 * rng.standard_normal((len(near), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        rows = [{"key": f"{start + i:09d}", "position": i, "caption": "", "clip_score": float(c), "sha256": None,
                 "width": 64, "height": 64, "phash": 0, "error": None} for i, c in enumerate(rng.random(m))]
        embeddings.write_shard(root, shard, x, np.zeros((m, 1), np.float32), rows)
        shards.append({"index": shard, "set": 0, "url": f"{shard:05d}.tar", "samples": m})
    embeddings.write_meta(root, {"model": {"source": "random", "weights": None, "random_init": True, "name": "x"},
                                 "sets": ["x"], "shards": shards})


STREAM_CHILD = """
import json, resource, sys, time
import numpy as np
from vlp.data_tools.curation import cluster_files, embeddings
root, k = sys.argv[1], int(sys.argv[2])
meta = json.load(open(root + "/embed.json"))
start = time.perf_counter()
emb = embeddings.load(root, [s["url"] for s in meta["shards"]])
rows = np.arange(emb.table.num_rows)
scores = emb.table.column("clip_score").to_numpy()
found, stats = cluster_files.semantic_duplicates(emb, rows, scores, np.zeros(len(rows), np.int64), k,
                                                 cluster_files.Checks(0.95))
print(json.dumps({"seconds": time.perf_counter() - start, "removed": len(found), "buckets": stats.buckets,
                  "largest_bucket": stats.largest_bucket,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def stream(args) -> None:
    """SemDeDup through cluster files on an embed output of N random embeddings: time and peak memory of the
    deciding process (a fresh one per size), against the size of the embeddings."""
    rows = []
    for n in (int(v) for v in args.stream.split(",")):
        root = Path(args.work) / f"emb-{n}-{args.dim}"
        start = time.perf_counter()
        _synthetic_embeddings(root, n, args.dim)
        made = time.perf_counter() - start
        k = max(1, n // 1000)
        done = subprocess.run([sys.executable, "-c", STREAM_CHILD, str(root), str(k)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        r = json.loads(done.stdout.strip().splitlines()[-1])
        embeddings_mib = n * args.dim * 4 / 2**20
        print(f"{n} samples, dim {args.dim}, k {k}: {r['seconds']:.0f} s, {r['removed']} removed, {r['buckets']} "
              f"buckets (largest {r['largest_bucket']}), peak RSS {r['peak_mib']:.0f} MiB; the embeddings in memory "
              f"would be {embeddings_mib:.0f} MiB (written in {made:.0f} s)", flush=True)
        rows.append([n, k, f"{r['seconds']:.0f}", r["buckets"], r["largest_bucket"], f"{r['peak_mib']:.0f}",
                     f"{embeddings_mib:.0f}"])
    write_result("curation_stream", "SemDeDup through cluster files (random embeddings)", [{
        "columns": ["samples", "clusters", "seconds", "buckets", "largest bucket", "peak RSS, MiB",
                    "embeddings as float32, MiB"], "rows": rows}], order=46,
        about=f"dim {args.dim}; 5% planted near-duplicates; one shard per {SHARD_ROWS} samples; threshold 0.95; "
              "k-means on at most 256 points per centroid and 1M points; buckets of about 256 MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="runs/demo", help="a trained run or exported model (vlp demo: runs/demo)")
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--work", default="/tmp/vlp-bench-curation")
    parser.add_argument("--ab", action="store_true", help="also train on raw vs curated and evaluate both")
    parser.add_argument("--ab-samples", type=int, default=96000)
    parser.add_argument("--scale", help="comma-separated sample counts: time curate's decisions on random embeddings")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--stream", help="comma-separated sample counts: SemDeDup through cluster files, time and "
                        "peak memory")
    parser.add_argument("--real", choices=["emoji", "openmoji"], help="the planted-defect bench on this real set "
                        "(bench/real_sets.py's) with a model trained on it")
    parser.add_argument("--real-work", default="/tmp/vlp-bench-real", help="where bench/real_sets.py keeps its sets")
    parser.add_argument("--real-samples", type=int, default=30000, help="the scoring model's training samples")
    parser.add_argument("--scorer", choices=["in-set", "other-set"], default="in-set",
                        help="with --real: embed with a model trained on the planted pairs, or on the other real set")
    args = parser.parse_args()
    if args.scale:
        return scale(args)
    if args.stream:
        return stream(args)
    if args.real:
        return planted_real(args)
    planted(args)


if __name__ == "__main__":
    main()
