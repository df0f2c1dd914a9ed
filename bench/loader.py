"""Loader throughput: vlp's ShardLoader vs open_clip_train's webdataset pipeline, in one run.

    python bench/loader.py [--n 3000] [--workers 2] [--batch 128] [--image-size 224]
                            [--shuffle-buffer 1000] [--http]

Both read the same JPEG shards (256-1024 px images, kept at full size by
`vlp shards build --resize-mode no`), decode, apply open_clip's train
augmentation (random resized crop, scale 0.9-1.0, bicubic, to --image-size),
tokenise with open_clip's tokenizer, and batch, with the same number of
DataLoader workers. Printed: samples/s over the batches after the first
(worker start-up excluded), and the ratio.

vlp hands uint8 images to the trainer, which normalises them on the device;
the "+ normalise on CPU" row adds that step in the main process, to show the
cost where there is no GPU to hide it.

open_clip_train runs from its own virtualenv (bench/baselines.py).

--http compares vlp's loader on the same shards read from local disk, from a
loopback HTTP server (tests/http_server.py, fetched with curl as in
training, with the build's manifest for the counts) and from a loopback S3
API (moto's server behind tests/s3_server.py's counting proxy, read with
s3fs), and prints the GETs each shard got in the epoch: one per loader
worker that reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # bench/ is not a package

from baselines import markdown, open_clip_python, write_result  # noqa: E402

BASELINE = r"""
import argparse, json, sys, time
import open_clip
from open_clip_train.data import get_wds_dataset
cfg = json.loads(sys.argv[1])
args = argparse.Namespace(train_data=cfg["spec"], train_num_samples=cfg["samples"], dataset_resampled=False,
    seed=0, batch_size=cfg["batch"], workers=cfg["workers"], world_size=1, train_data_upsampling_factors=None)
preprocess = open_clip.image_transform(cfg["size"], is_train=True)
data = get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
it = iter(data.dataloader)
images, texts = next(it)
start, n = time.perf_counter(), 0
for images, texts in it:
    n += images.shape[0]
print(json.dumps({"samples": n, "seconds": time.perf_counter() - start}))
"""


def make_shards(work: Path, n: int) -> Path:
    from shards import make_images, write_csv

    out = work / "shards"
    if (out / "manifest.json").exists() and json.loads((out / "manifest.json").read_text())["rows"] == n:
        return out
    images = make_images(work / "images", n)
    csv_path = write_csv(work / "pairs.csv", [str(p) for p in images])
    subprocess.run([sys.executable, "-m", "vlp", "shards", "build", str(csv_path), "--output", str(out),
                    "--resize-mode", "no", "--encode-quality", "90", "--shard-size", "250", "--quiet", "--overwrite"],
                   check=True)
    return out


def run_vlp(shards: Path | str, args, normalise: bool, manifest: str | None = None) -> tuple[int, float]:
    from vlp.core.config import DataConfig, DataSource, ModelConfig
    from vlp.core.models import create_model, image_normalization
    from vlp.train.loader.batches import ShardLoader, normalize

    model, _, _, tokenizer = create_model(ModelConfig(name="ViT-B-32"))
    mean, std = image_normalization(model)
    del model
    source = DataSource(shards=str(shards), manifest=manifest)
    cfg = DataConfig(sources=[source], workers=args.workers, shuffle_buffer=args.shuffle_buffer)
    loader = ShardLoader(cfg, batch_size=args.batch, image_size=args.image_size, tokenizer=tokenizer)
    it = iter(loader.epoch(0))
    next(it)
    start, n = time.perf_counter(), 0
    for batch in it:
        if normalise:
            normalize(batch.images, mean, std)
        n += batch.images.shape[0]
    return n, time.perf_counter() - start


def run_open_clip(shards: Path, args) -> tuple[int, float]:
    manifest = json.loads((shards / "manifest.json").read_text())
    last = len(manifest["shards"]) - 1
    cfg = {"spec": f"{shards}/{{00000..{last:05d}}}.tar", "samples": manifest["written"], "batch": args.batch,
           "workers": args.workers, "size": args.image_size}
    out = subprocess.run([str(open_clip_python()), "-c", BASELINE, json.dumps(cfg)], check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["samples"], result["seconds"]


def compare_http(shards: Path, args) -> None:
    """samples/s from local disk and from the loopback HTTP server, and the GETs of the HTTP epoch."""
    sys.path.insert(0, str(ROOT.parent / "tests"))
    from http_server import serve

    last = len(json.loads((shards / "manifest.json").read_text())["shards"]) - 1
    rows = []
    n, seconds = run_vlp(shards, args, normalise=False)
    rows.append(("local disk", n / seconds, "-"))
    print(f"  local disk: {n} samples in {seconds:.1f}s", flush=True)
    with serve(shards) as (base, hits):
        n, seconds = run_vlp(f"{base}/{{00000..{last:05d}}}.tar", args, normalise=False,
                             manifest=str(shards / "manifest.json"))
        gets = dict(sorted(hits.items()))
    print(f"  loopback HTTP: {n} samples in {seconds:.1f}s", flush=True)
    rows.append(("loopback HTTP (curl)", n / seconds, _gets(gets)))
    n, seconds, gets = _from_s3(shards, last, args)
    print(f"  loopback S3: {n} samples in {seconds:.1f}s", flush=True)
    rows.append(("loopback S3 (s3fs)", n / seconds, _gets(gets)))
    table = {"title": f"vlp ShardLoader, one epoch, {args.n} JPEGs 256-1024 px -> {args.image_size} px, "
                      f"batch {args.batch}, {args.workers} workers, shuffle buffer {args.shuffle_buffer}",
             "columns": ["shards from", "samples/s", "GETs in the epoch"],
             "rows": [[name, f"{rate:.0f}", get] for name, rate, get in rows]}
    print(markdown(table))
    write_result("loader_remote", "The training loader from local disk, HTTP and S3", [table], order=52)


def _gets(gets: dict) -> str:
    return f"{sum(gets.values())} for {len(gets)} shards (per shard: {', '.join(map(str, sorted(set(gets.values()))))})"


def _from_s3(shards: Path, last: int, args) -> tuple[int, float, dict]:
    """The same epoch from moto's S3 server on loopback; GETs of .tar objects counted by the proxy."""
    from s3_server import S3Server

    server = S3Server().start()
    try:
        os.environ.update(server.env())
        client = server.client()
        client.create_bucket(Bucket="bench")
        for p in sorted(shards.iterdir()):
            if p.suffix in (".tar", ".json"):
                client.upload_file(str(p), "bench", f"shards/{p.name}")
        server.hits.clear()
        n, seconds = run_vlp(f"s3://bench/shards/{{00000..{last:05d}}}.tar", args, normalise=False,
                             manifest="s3://bench/shards/manifest.json")
        gets = {path: c for (method, path), c in server.hits.items() if method == "GET" and path.endswith(".tar")}
        return n, seconds, gets
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--work", default="/tmp/vlp-bench-loader")
    parser.add_argument("--http", action="store_true", help="local disk vs a loopback HTTP server, with GET counts")
    args = parser.parse_args()
    shards = make_shards(Path(args.work), args.n)
    if args.http:
        compare_http(shards, args)
        return
    open_clip_python()
    rows = []
    for name, fn in [("open_clip_train (webdataset 0.2.86)", lambda: run_open_clip(shards, args)),
                     ("vlp ShardLoader", lambda: run_vlp(shards, args, normalise=False)),
                     ("vlp ShardLoader + normalise on CPU", lambda: run_vlp(shards, args, normalise=True))]:
        n, seconds = fn()
        rows.append((name, n / seconds, n))
        print(f"  {name}: {n} samples in {seconds:.1f}s", flush=True)
    base = rows[0][1]
    table = {"title": f"decode + augment + tokenise, {args.n} JPEGs 256-1024 px -> {args.image_size} px, "
                      f"batch {args.batch}, {args.workers} workers",
             "columns": ["loader", "samples/s", "vs open_clip_train"],
             "rows": [[name, f"{rate:.0f}", f"{rate / base:.2f}x"] for name, rate, _ in rows]}
    print(markdown(table))
    write_result("loader", "The training loader against open_clip_train's pipeline", [table], order=51)


if __name__ == "__main__":
    main()
