"""Shard-building speed: vlp vs img2dataset on the same pairs, in one run.

    python bench/shards.py [--n 5000] [--workers 2] [--image-size 256]

Makes N JPEGs of 256-1024 px (smooth colour fields with mild noise, so file
sizes are photo-like), writes one CSV of file:// URLs and one of http URLs
served by a loopback HTTP server (in its own process), and builds
webdataset shards from each with both tools using the same settings: border
resize to --image-size, JPEG quality 95, the same number of processes, 16
threads each, shards of 500 rows (img2dataset parallelises per shard). Prints
images written per second and the ratio.

img2dataset pins webdataset < 0.3, so it runs from its own virtualenv
(bench/baselines.py).

    python bench/shards.py --compare ray [--ray-address HEAD:PORT]

compares vlp's two engines instead: the local process pool and `--engine ray`
(tasks on a Ray instance the build starts on this machine with --workers CPUs,
or on the cluster at --ray-address), on the same inputs and settings. The Ray
figure includes starting or connecting to Ray, as a user's run does.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # bench/ is not a package

from baselines import img2dataset_python  # noqa: E402


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        w, h = (int(v) for v in rng.integers(256, 1025, size=2))
        field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(field, dtype=np.int16) + rng.normal(0, 4, (h, w, 3)).astype(np.int16)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
    return paths


def write_csv(path: Path, urls: list[str]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["url", "caption"])
        writer.writerows([u, f"benchmark image {i}"] for i, u in enumerate(urls))
    return path


def serve(folder: str, port: int) -> None:
    """A threading file server with a deep accept queue: http.server's default of 5
    pending connections makes 32 concurrent clients wait for SYN retries (1 s each)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Server(ThreadingHTTPServer):
        request_queue_size = 256
        daemon_threads = True

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass

    Server(("127.0.0.1", port), functools.partial(Quiet, directory=folder)).serve_forever()


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """The file server in its own process, so it does not share a GIL with either tool."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(folder), "--port", str(port)])
    time.sleep(1.0)
    return proc, f"http://127.0.0.1:{port}"


def run_vlp(csv_path: Path, out: Path, args, engine: str = "local") -> tuple[float, int]:
    cmd = [sys.executable, "-m", "vlp", "shards", "build", str(csv_path), "--output", str(out), "--overwrite",
           "--image-size", str(args.image_size), "--resize-mode", "border", "--encode-quality", "95",
           "--workers", str(args.workers), "--threads", "16", "--shard-size", "500", "--quiet",
           "--engine", engine]
    if engine == "ray" and args.ray_address:
        cmd += ["--ray-address", args.ray_address]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return seconds, json.loads((out / "manifest.json").read_text())["written"]


def run_img2dataset(csv_path: Path, out: Path, args) -> tuple[float, int]:
    py = img2dataset_python()
    cmd = [str(py), "-m", "img2dataset.main", "--url_list", str(csv_path), "--input_format", "csv",
           "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
           "--output_folder", str(out), "--processes_count", str(args.workers), "--thread_count", "16",
           "--image_size", str(args.image_size), "--resize_mode", "border", "--encode_quality", "95",
           "--number_sample_per_shard", "500", "--extract_exif", "False", "--enable_wandb", "False"]
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    written = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return seconds, written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--work", default="/tmp/vlp-bench-shards")
    parser.add_argument("--compare", choices=("img2dataset", "ray"), default="img2dataset",
                        help="img2dataset: vlp vs img2dataset; ray: vlp's local engine vs --engine ray")
    parser.add_argument("--ray-address", help="with --compare ray: a running cluster (default: start one here)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run the file server
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.port)
    work = Path(args.work)
    t0 = time.perf_counter()
    images = make_images(work / "images", args.n)
    print(f"{args.n} source JPEGs ready ({sum(p.stat().st_size for p in images) / 1e6:.0f} MB, "
          f"{time.perf_counter() - t0:.0f}s)", flush=True)
    if args.compare == "img2dataset":
        img2dataset_python()
    server, base = start_server(work / "images")
    try:
        sources = {
            "local (file://)": write_csv(work / "local.csv", [p.as_uri() for p in images]),
            "http (loopback)": write_csv(work / "http.csv", [f"{base}/{p.name}" for p in images]),
        }
        if args.compare == "ray":
            return compare_engines(sources, work, args)
        rows = []
        for name, csv_path in sources.items():
            vlp_s, vlp_n = run_vlp(csv_path, work / "out-vlp", args)
            i2d_s, i2d_n = run_img2dataset(csv_path, work / "out-img2dataset", args)
            rows.append((name, vlp_n / vlp_s, vlp_n, i2d_n / i2d_s, i2d_n))
            print(f"  {name}: vlp {vlp_n} in {vlp_s:.1f}s, img2dataset {i2d_n} in {i2d_s:.1f}s", flush=True)
    finally:
        server.terminate()
    print(f"\nshard building, {args.n} JPEGs 256-1024 px -> {args.image_size} px border, "
          f"{args.workers} processes x 16 threads")
    print("| source | vlp images/s | img2dataset images/s | ratio |")
    print("|---|---|---|---|")
    for name, vlp_rate, vlp_n, i2d_rate, i2d_n in rows:
        print(f"| {name} | {vlp_rate:.0f} ({vlp_n} written) | {i2d_rate:.0f} ({i2d_n} written) | "
              f"{vlp_rate / i2d_rate:.2f}x |")


def compare_engines(sources: dict[str, Path], work: Path, args) -> None:
    rows = []
    for name, csv_path in sources.items():
        local_s, local_n = run_vlp(csv_path, work / "out-local", args, "local")
        ray_s, ray_n = run_vlp(csv_path, work / "out-ray", args, "ray")
        same = all((work / "out-local" / p.name).read_bytes() == p.read_bytes()
                   for p in (work / "out-ray").iterdir() if p.is_file() and p.name != ".build.json")
        rows.append((name, local_n / local_s, local_n, ray_n / ray_s, ray_n, same))
        print(f"  {name}: local {local_n} in {local_s:.1f}s, ray {ray_n} in {ray_s:.1f}s", flush=True)
    where = args.ray_address or f"a Ray instance started here with {args.workers} CPUs"
    print(f"\nshard building, {args.n} JPEGs 256-1024 px -> {args.image_size} px border, "
          f"{args.workers} processes x 16 threads; ray: {where}")
    print("| source | local images/s | ray images/s | ratio | same files |")
    print("|---|---|---|---|---|")
    for name, local_rate, local_n, ray_rate, ray_n, same in rows:
        print(f"| {name} | {local_rate:.0f} ({local_n} written) | {ray_rate:.0f} ({ray_n} written) | "
              f"{ray_rate / local_rate:.2f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
