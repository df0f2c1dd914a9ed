"""Shard-building speed: vlp vs img2dataset on the same pairs, in one run.

    python bench/shards.py [--n 5000] [--workers 2] [--image-size 256] [--repeat 3]

Makes N JPEGs of 256-1024 px (smooth colour fields with mild noise, so file
sizes are photo-like), writes one CSV of file:// URLs and one of http URLs
served by a loopback HTTP server (in its own process), and builds
webdataset shards from each with both tools using the same settings: border
resize to --image-size, JPEG quality 95, the same number of processes, 16
threads each, shards of 500 rows (img2dataset parallelises per shard). The tools
alternate, --repeat runs each; prints the median images written per second, the
range, and the ratio of the medians. Each tool also builds the first --small rows,
which gives its start-up time and its marginal rate (what the rows past those cost:
the rate a long build runs at; img2dataset starts several seconds slower, which
flatters the end-to-end ratio of a short bench).

img2dataset pins webdataset < 0.3, so it runs from its own virtualenv
(bench/baselines.py).

    python bench/shards.py --compare ray [--ray-address HEAD:PORT]

compares vlp's two engines instead: the local process pool and `--engine ray`
(tasks on a Ray instance the build starts on this machine with --workers CPUs, then on
one started beforehand with `ray start --head` as a Ray user's builds run, or on the
cluster at --ray-address), on the same inputs and settings. The Ray
figure includes starting or connecting to Ray, as a user's run does; a second build of the
first --small rows with each engine gives its start-up time and marginal rate apart. With
--two-nodes it also builds on the tests' two-node cluster (tests/ray_cluster.py:
head + a node in its own network namespace, 1 CPU each; needs root); with --pinned each
node's processes run on a core of their own (taskset: the head on core 0, the node on core 1),
the build's own process (the driver and single writer) on the head's core, as on a head machine,
and a one-node cluster pinned alike is the baseline of the scaling figure.

    python bench/shards.py --compare s3

builds the same local-file inputs into a local folder and into s3:// on moto's
S3 server on loopback (tests/s3_server.py, in this process), and checks the
objects equal the local files.

    python bench/shards.py --latency 50,300 --hosts 1000 [--n 2000]

the same comparison against a server that emulates the web: each request answered after a
delay drawn uniformly from the range (ms), the images spread over --hosts hosts (loopback
addresses 127.1.x.y of their own, one asyncio listener each, so per-host limits see 1,000
hosts). Both tools get the same processes and threads: 16 per process (vlp's default) and 64
(what a crawl would use).

    python bench/shards.py --profile [--n 500]

times each step of one image in one thread, for vlp (read, sha256, header +
draft, decode, resize, encode) and for img2dataset's resizer (cv2 decode,
resize, encode; in its virtualenv), on the first N source JPEGs: where a
build's CPU time goes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # bench/ is not a package
sys.path.insert(0, str(ROOT.parent / "tests"))  # the tests' Ray cluster and S3 server

from baselines import img2dataset_python, markdown, write_result  # noqa: E402


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng([seed, i])  # its own: the same image whichever were made before
        w, h = (int(v) for v in rng.integers(256, 1025, size=2))
        field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(field, dtype=np.int16) + rng.normal(0, 4, (h, w, 3)).astype(np.int16)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
    return paths


def startup_and_rate(n: int, t_n: float, small: int, t_small: float) -> tuple[float, float]:
    """A tool's start-up seconds and marginal images/s from a build of n rows and one of the first `small`."""
    marginal = (n - small) / (t_n - t_small)
    return t_small - small / marginal, marginal


def _urls(csv_path: Path) -> list[str]:
    with open(csv_path, newline="") as fh:
        return [row["url"] for row in csv.DictReader(fh)]


def write_csv(path: Path, urls: list[str]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["url", "caption"])
        writer.writerows([u, f"benchmark image {i}"] for i, u in enumerate(urls))
    return path


def serve(folder: str, port: int, host: str = "127.0.0.1") -> None:
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

    Server((host, port), functools.partial(Quiet, directory=folder)).serve_forever()


def host_address(i: int) -> str:
    """The i-th emulated web host: a loopback address of its own (Linux routes all of 127/8 to lo)."""
    return f"127.1.{i // 250}.{1 + i % 250}"


def serve_latency(folder: str, port: int, hosts: int, latency: tuple[float, float]) -> None:
    """HTTP/1.1 GETs of files in `folder` on `hosts` loopback addresses, each answered after a delay."""
    import asyncio
    import random

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a listener per host, plus the connections
    root = Path(folder)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            await asyncio.sleep(random.uniform(*latency) / 1000)
            file = root / Path(request.split()[1].decode()).name  # a name in the folder, nothing else
            body = file.read_bytes() if file.is_file() else b""
            status = b"200 OK" if body else b"404 Not Found"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: image/jpeg\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (ConnectionError, IndexError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    async def run() -> None:
        for i in range(hosts):
            await asyncio.start_server(answer, host_address(i), port, backlog=256)
        await asyncio.Event().wait()

    asyncio.run(run())


def start_latency_server(folder: Path, hosts: int, latency: str) -> tuple[subprocess.Popen, int]:
    import socket

    with socket.socket() as s:
        s.bind((host_address(0), 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(folder), "--port", str(port),
                             "--hosts", str(hosts), "--latency", latency])
    time.sleep(2.0 + hosts / 500)
    return proc, port


def start_server(folder: Path, host: str = "127.0.0.1") -> tuple[subprocess.Popen, str]:
    """The file server in its own process, so it does not share a GIL with either tool."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(folder), "--port", str(port), "--host", host])
    time.sleep(1.0)
    return proc, f"http://{host}:{port}"


def run_vlp(csv_path: Path, out: Path | str, args, engine: str = "local", env: dict | None = None,
            address: str | None = None, threads: int = 16, core: int | None = None) -> tuple[float, int]:
    cmd = ([] if core is None else ["taskset", "-c", str(core)]) + [sys.executable, "-m", "vlp", "shards", "build", str(csv_path), "--output", str(out), "--overwrite",
           "--image-size", str(args.image_size), "--resize-mode", "border", "--encode-quality", "95",
           "--workers", str(args.workers), "--threads", str(threads), "--shard-size", "500", "--quiet",
           "--resize-filter", args.resize_filter,
           "--engine", engine]
    if engine == "ray" and (address or args.ray_address):
        cmd += ["--ray-address", address or args.ray_address]
    start = time.perf_counter()
    printed = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    seconds = time.perf_counter() - start
    return seconds, int(printed.split(" written=", 1)[1].split()[0])


def run_img2dataset(csv_path: Path, out: Path, args, threads: int = 16) -> tuple[float, int]:
    py = img2dataset_python()
    cmd = [str(py), "-m", "img2dataset.main", "--url_list", str(csv_path), "--input_format", "csv",
           "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
           "--output_folder", str(out), "--processes_count", str(args.workers), "--thread_count", str(threads),
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
    parser.add_argument("--repeat", type=int, default=3, help="vlp vs img2dataset: alternating runs per tool")
    parser.add_argument("--small", type=int, default=500,
                        help="vlp vs img2dataset: also build the first SMALL rows, for each tool's start-up time")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--resize-filter", default="lanczos", help="vlp's --resize-filter (box: img2dataset's "
                                                                  "INTER_AREA when shrinking)")
    parser.add_argument("--work", default="/tmp/vlp-bench-shards")
    parser.add_argument("--compare", choices=("img2dataset", "ray", "s3"), default="img2dataset",
                        help="img2dataset: vlp vs img2dataset; ray: vlp's local engine vs --engine ray; "
                             "s3: a local folder vs s3:// on a loopback S3 server")
    parser.add_argument("--profile", action="store_true", help="per-step CPU time of one image, vlp vs img2dataset")
    parser.add_argument("--ray-address", help="with --compare ray: a running cluster (default: start one here)")
    parser.add_argument("--two-nodes", action="store_true",
                        help="with --compare ray: also on a two-node cluster (second node in a netns)")
    parser.add_argument("--pinned", action="store_true",
                        help="with --two-nodes: each node's processes on a core of its own (taskset), and a "
                             "one-node cluster pinned alike to compare with: the scaling figure")
    parser.add_argument("--latency", help="LO,HI: a web-like server answering after LO-HI ms (uniform)")
    parser.add_argument("--hosts", type=int, default=1000, help="with --latency: hosts the images are spread over")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run the file server
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve and args.latency:
        return serve_latency(args.serve, args.port, args.hosts, tuple(float(v) for v in args.latency.split(",")))
    if args.serve:
        return serve(args.serve, args.port, args.host)
    work = Path(args.work)
    t0 = time.perf_counter()
    images = make_images(work / "images", args.n)
    print(f"{args.n} source JPEGs ready ({sum(p.stat().st_size for p in images) / 1e6:.0f} MB, "
          f"{time.perf_counter() - t0:.0f}s)", flush=True)
    if args.profile:
        return profile(images[: args.n], args)
    if args.compare == "s3":
        return compare_s3(write_csv(work / "local.csv", [p.as_uri() for p in images]), work, args)
    if args.latency:
        return compare_latency(images, work, args)
    if args.compare == "img2dataset":
        img2dataset_python()
    host = "127.0.0.1"
    if args.compare == "ray" and args.two_nodes:  # the node in its namespace fetches from the bridge's address
        import ray_cluster

        ray_cluster.HOSTS.up()
        host = ray_cluster.HEAD_IP
    server, base = start_server(work / "images", host)
    try:
        sources = {
            "local (file://)": write_csv(work / "local.csv", [p.as_uri() for p in images]),
            "http (loopback)": write_csv(work / "http.csv", [f"{base}/{p.name}" for p in images]),
        }
        if args.compare == "ray":
            return compare_engines(sources, work, args)
        small = min(args.small, args.n // 2)
        rows = []
        for name, csv_path in sources.items():
            head = write_csv(csv_path.with_name(f"head-{csv_path.name}"), _urls(csv_path)[:small])
            seconds: dict[str, dict[str, list[float]]] = {"vlp": {"n": [], "small": []}, "img2dataset": {"n": [], "small": []}}
            for _ in range(args.repeat):  # the tools alternate, so a drift in the machine's speed hits both
                for tool, run in (("vlp", run_vlp), ("img2dataset", run_img2dataset)):
                    for size, path in (("small", head), ("n", csv_path)):
                        took, written = run(path, work / f"out-{tool}", args)
                        assert written == (small if size == "small" else args.n), f"{tool} wrote {written}"
                        seconds[tool][size].append(took)
                        print(f"  {name}: {tool} {written} in {took:.1f}s", flush=True)
            rows.append((name, seconds))
    finally:
        server.terminate()

    def rates(tool_seconds: dict[str, list[float]]) -> tuple[str, float, float, float]:
        """images/s end to end (median, range), its median, the start-up and the marginal rate: what rows past
        the first `small` cost, the figure a long build runs at."""
        whole = [args.n / t for t in tool_seconds["n"]]
        startup, marginal = startup_and_rate(args.n, statistics.median(tool_seconds["n"]), small,
                                             statistics.median(tool_seconds["small"]))
        return (f"{statistics.median(whole):.0f} ({min(whole):.0f}-{max(whole):.0f})", statistics.median(whole),
                startup, marginal)

    table_rows = []
    for name, seconds in rows:
        (v_text, v, v_start, v_marg), (i_text, i, i_start, i_marg) = rates(seconds["vlp"]), rates(seconds["img2dataset"])
        table_rows.append([name, v_text, i_text, f"{v / i:.2f}x", f"{v_start:.1f} / {i_start:.1f}",
                           f"{v_marg:.0f} / {i_marg:.0f}", f"{v_marg / i_marg:.2f}x"])
    table = {"title": f"shard building, {args.n} JPEGs 256-1024 px -> {args.image_size} px border, "
                      f"{args.workers} processes x 16 threads; vlp --resize-filter {args.resize_filter}; median of "
                      f"{args.repeat} alternating runs per tool (range); start-up and marginal rate from the medians "
                      f"of runs on the first {small} rows and on all {args.n}",
             "columns": ["source", "vlp images/s", "img2dataset images/s", "ratio of medians",
                         "start-up s, vlp / img2dataset", "marginal images/s, vlp / img2dataset", "marginal ratio"],
             "rows": table_rows}
    print(markdown(table))
    write_result(f"shards_vs_img2dataset_{args.resize_filter}", "Shard building: vlp vs img2dataset", [table],
                 order=35)


def compare_latency(images: list[Path], work: Path, args) -> None:
    """vlp and img2dataset on the web-like server (--latency, --hosts), at equal settings: 16 threads per process
    (vlp's default) and 64 (what a crawl would use)."""
    img2dataset_python()
    server, port = start_latency_server(work / "images", args.hosts, args.latency)
    runs = {}
    try:
        csv_path = write_csv(work / "latency.csv", [f"http://{host_address(i % args.hosts)}:{port}/{p.name}"
                                                   for i, p in enumerate(images)])
        for threads in (16, 64):
            runs[threads] = (run_vlp(csv_path, work / "out-vlp", args, threads=threads),
                             run_img2dataset(csv_path, work / "out-img2dataset", args, threads=threads))
    finally:
        server.terminate()
    rows = []
    for threads, ((t, n), (t2, n2)) in runs.items():
        rows.append([str(threads), f"{n / t:.0f} ({n} written, {t:.1f} s)", f"{n2 / t2:.0f} ({n2} written, {t2:.1f} s)",
                     f"{(n / t) / (n2 / t2):.2f}x"])
        print("  " + " | ".join(rows[-1]), flush=True)
    table = {"title": f"shard building from a web-like server: {args.n} JPEGs 256-1024 px over {args.hosts} "
                      f"loopback hosts, each request answered after {args.latency.replace(',', '-')} ms; -> "
                      f"{args.image_size} px border, {args.workers} processes; vlp --resize-filter {args.resize_filter}",
             "columns": ["threads per process", "vlp images/s", "img2dataset images/s", "vlp / img2dataset"],
             "rows": rows}
    print(markdown(table))
    write_result(f"shards_latency_{args.resize_filter}", "Shard building from a server with web-like latency", [table],
                 order=36)


def _same_files(a: Path, b: Path) -> bool:
    return all((a / p.name).read_bytes() == p.read_bytes() for p in b.iterdir()
               if p.is_file() and p.name != ".build.json")


def compare_engines(sources: dict[str, Path], work: Path, args) -> None:
    """Local and Ray on this machine per source; then, with --two-nodes, the two-node cluster (started only
    for its runs: its idle daemons would slow the others down)."""
    runs: dict[str, dict] = {name: {} for name in sources}
    folders = {name: [work / f"out-{i}-{k}" for k in range(2)] for i, name in enumerate(sources)}
    small = min(args.small, args.n // 2)
    startup: dict[str, dict] = {name: {} for name in sources}  # local and Ray started by the build

    def both_builds(name: str, label: str, folder: Path, engine: str, **where) -> None:
        """The whole build, then the first `small` rows alone: the full rate, start-up and marginal rate."""
        csv_path = sources[name]
        runs[name][label] = run_vlp(csv_path, folder, args, engine, **where)
        head = csv_path.with_name(f"head-{csv_path.name}")
        startup[name][label] = startup_and_rate(args.n, runs[name][label][0], small,
                                                run_vlp(head, work / "out-small", args, engine, **where)[0])

    for name, csv_path in sources.items():
        write_csv(csv_path.with_name(f"head-{csv_path.name}"), _urls(csv_path)[:small])
        both_builds(name, "local", folders[name][0], "local")
        both_builds(name, "ray, 1 node", folders[name][1], "ray")
    if not args.ray_address:  # as a Ray user builds: on an instance already running (`ray start --head`)
        import ray_cluster

        cluster = ray_cluster.start(work / "ray-running", netns=False, nodes=1, head_cpus=args.workers)
        try:
            for i, name in enumerate(sources):
                folders[name].append(work / f"out-{i}-running")
                both_builds(name, "ray, 1 node running", folders[name][-1], "ray",
                            env={**os.environ, **cluster.env}, address=cluster.address)
        finally:
            ray_cluster.stop(cluster)
    if args.two_nodes:
        import ray_cluster

        try:
            clusters = [(1, "ray, 1 pinned node"), (2, "ray, 2 pinned nodes")] if args.pinned else [(2, "ray, 2 nodes")]
            for nodes, label in clusters:
                cluster = ray_cluster.start(work / f"ray-cluster-{nodes}", network_up=True, nodes=nodes,
                                            pinned=args.pinned)
                try:
                    for name in sources:
                        folder = work / f"out-{list(sources).index(name)}-{label.replace(' ', '_')}"
                        folders[name].append(folder)
                        # pinned: the build (the driver, the single writer) runs on the head's core, as it
                        # would on the head machine; a one-node cluster then has no second core to borrow
                        both_builds(name, label, folder, "ray", env={**os.environ, **cluster.env},
                                    address=cluster.address, core=0 if args.pinned else None)
                finally:
                    ray_cluster.stop(cluster)
        finally:
            ray_cluster.HOSTS.down()
    rows = []
    for name in sources:
        same = all(_same_files(folders[name][0], folders[name][k]) for k in range(1, len(runs[name])))
        rows.append((name, runs[name], same))
        print(f"  {name}: " + ", ".join(f"{k} {n} in {t:.1f}s" for k, (t, n) in runs[name].items()), flush=True)
    where = args.ray_address or f"1 node: a Ray instance started here with {args.workers} CPUs"
    if args.two_nodes:
        where += "; 2 nodes: head + a node in a network namespace, 1 CPU each, on this machine's cores"
        if args.pinned:
            where += (" (pinned: the head's processes and the build's own process, the driver, on core 0, the "
                      "node's on core 1; 1 pinned node: the head alone)")
    names = list(rows[0][1])
    table_rows = []
    for name, runs, same in rows:
        base = runs["local"][1] / runs["local"][0]
        table_rows.append([name, *[f"{n / t:.0f} ({n / t / base:.2f}x)" for t, n in runs.values()],
                           "yes" if same else "NO"])
    table = {"title": f"shard building, {args.n} JPEGs 256-1024 px -> {args.image_size} px border, "
                      f"{args.workers} processes x 16 threads; ray {where}",
             "columns": ["source", *[f"{k} images/s" for k in names], "same files"], "rows": table_rows}
    marginal = {"title": f"start-up and marginal rate, from a second build of the first {small} rows with each "
                         "engine (ray, 1 node: the instance the build starts and stops; running: one started "
                         f"beforehand with `ray start --head --num-cpus {args.workers}`)",
                "columns": ["source", "engine", "start-up s", "marginal images/s", "marginal / local"],
                "rows": [[name, label, f"{t0:.1f}", f"{rate:.0f}", f"{rate / v['local'][1]:.2f}x"]
                         for name, v in startup.items() for label, (t0, rate) in v.items()]}
    tables = [table, marginal]
    if args.pinned:  # the scaling: the whole build (start-up included) and past the start-up
        pair = ("ray, 1 pinned node", "ray, 2 pinned nodes")
        tables.append({"title": "2 pinned nodes / 1 pinned node", "columns": ["source", "whole build", "marginal"],
                       "rows": [[name, f"{whole[pair[0]][0] / whole[pair[1]][0]:.2f}x",
                                 f"{startup[name][pair[1]][1] / startup[name][pair[0]][1]:.2f}x"]
                                for name, whole, _ in rows]})
    for t in tables:
        print(markdown(t))
    # the two-node scaling runs and the one-node comparison are kept apart: neither overwrites the other,
    # nor does a run of another size overwrite the default size's
    size = "" if args.n == 5000 else f"_{args.n}"
    write_result(("shards_ray" if args.two_nodes else "shards_ray_one_node") + size,
                 "Shard building: the local engine vs --engine ray" + ("" if args.two_nodes else ", one node"),
                 tables, order=36)


def compare_s3(csv_path: Path, work: Path, args) -> None:
    from s3_server import S3Server

    server = S3Server().start()
    try:
        env = {**os.environ, **server.env()}
        server.client().create_bucket(Bucket="bench")
        local_s, local_n = run_vlp(csv_path, work / "out-local", args)
        s3_s, s3_n = run_vlp(csv_path, "s3://bench/out", args, env=env)
        client = server.client()
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="bench", Prefix="out/")["Contents"]]
        same = all(client.get_object(Bucket="bench", Key=k)["Body"].read() == (work / "out-local" / k[4:]).read_bytes()
                   for k in keys)
        puts = sum(n for (method, _), n in server.hits.items() if method == "PUT")
    finally:
        server.stop()
    table = {"title": f"shard building to storage, {args.n} JPEGs -> {args.image_size} px border, "
                      f"{args.workers} processes", "columns": ["output", "images/s", "ratio", "same files"],
             "rows": [["local folder", f"{local_n / local_s:.0f} ({local_n} written)", "1.00x", ""],
                      [f"s3:// (moto on loopback, {puts} PUTs for {len(keys)} objects)",
                       f"{s3_n / s3_s:.0f} ({s3_n} written)", f"{(s3_n / s3_s) / (local_n / local_s):.2f}x",
                       "yes" if same else "NO"]]}
    print(markdown(table))
    write_result("shards_s3", "Shard building into object storage", [table], order=37)


VLP_STEPS = ("read", "sha256", "header + draft", "decode", "resize", "encode")
I2D_PROFILE = r"""
import json, sys, time
import cv2, numpy as np
cv2.setNumThreads(1)
from img2dataset.resizer import Resizer
resizer = Resizer(image_size=int(sys.argv[1]), resize_mode="border", resize_only_if_bigger=False, encode_quality=95)
t = dict.fromkeys(("read", "decode", "resize + encode"), 0.0)
for path in sys.argv[2:]:
    a = time.perf_counter(); data = open(path, "rb").read(); b = time.perf_counter()
    cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED); c = time.perf_counter()
    import io; resizer(io.BytesIO(data)); d = time.perf_counter()
    t["read"] += b - a; t["decode"] += c - b; t["resize + encode"] += (d - c) - (c - b)  # resizer decodes again
print(json.dumps(t))
"""


def profile(images: list[Path], args) -> None:
    """Per-step time of one image in one thread: vlp's steps, and img2dataset's resizer in its venv."""
    import hashlib

    from vlp.data_tools import reencode as shard_images
    from vlp.data_tools.build import image_options

    from vlp.core.config import ShardsBuildConfig
    from vlp.core.images import decoding, draft, open_image, to_rgb_pixels

    opts = image_options(ShardsBuildConfig(inputs=["x.csv"], output="o", image_size=args.image_size,
                                           resize_mode="border", encode_quality=95, resize_filter=args.resize_filter))
    t = dict.fromkeys(VLP_STEPS, 0.0)
    for path in images:
        marks = [time.perf_counter()]
        data = path.read_bytes()
        marks.append(time.perf_counter())
        hashlib.sha256(data).hexdigest()
        marks.append(time.perf_counter())
        img = open_image(data, ".jpg")
        draft(img, shard_images._scale(*img.size, opts))
        marks.append(time.perf_counter())
        with decoding(img):
            pixels = to_rgb_pixels(img)
            marks.append(time.perf_counter())
            small = shard_images._resize(pixels, opts)
            marks.append(time.perf_counter())
        shard_images._encode(small, opts)
        marks.append(time.perf_counter())
        for step, a, b in zip(VLP_STEPS, marks, marks[1:], strict=False):
            t[step] += b - a
    i2d = json.loads(subprocess.run([str(img2dataset_python()), "-c", I2D_PROFILE, str(args.image_size),
                                     *map(str, images)], check=True, capture_output=True, text=True).stdout)
    n = len(images)
    i2d_rows = {"read": i2d["read"], "decode": i2d["decode"], "resize": i2d["resize + encode"]}
    rows = []
    for step in VLP_STEPS:
        other = f"{1000 * i2d_rows[step] / n:.2f}" if step in i2d_rows else ("(in resize)" if step == "encode" else "-")
        rows.append([step, f"{1000 * t[step] / n:.2f}", other])
    rows.append(["total", f"{1000 * sum(t.values()) / n:.2f}", f"{1000 * sum(i2d.values()) / n:.2f}"])
    table = {"title": f"ms per image in one thread, {n} JPEGs 256-1024 px -> {args.image_size} px border, quality 95",
             "columns": ["step", "vlp", "img2dataset"], "rows": rows}
    print(markdown(table))
    write_result("shards_profile", "Shard building: one image's CPU time by step", [table], order=38,
                 notes=driver_cost(images, args))


def driver_cost(images: list[Path], args) -> str:
    """CPU time of the build's single writer (this process: reading rows, dedup, tars, records) per image,
    apart from its workers': what bounds a build however many machines decode (the Ray engine's driver)."""
    from vlp.data_tools.build import build_shards

    from vlp.core.config import ShardsBuildConfig

    csv_path = write_csv(Path(args.work) / "profile.csv", [p.as_uri() for p in images])
    cfg = ShardsBuildConfig(inputs=[str(csv_path)], output=str(Path(args.work) / "out-profile"), overwrite=True,
                            image_size=args.image_size, resize_mode="border", encode_quality=95, resize_filter=args.resize_filter,
                            workers=args.workers, shard_size=500, quiet=True)
    def cpu() -> tuple[float, float]:  # (this process, its finished children: the workers once the pool is shut)
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime

    before = cpu()
    start = time.perf_counter()
    summary = build_shards(cfg, progress=False)
    seconds = time.perf_counter() - start
    own, workers = (a - b for a, b in zip(cpu(), before, strict=True))
    line = (f"build of the same {len(images)} images, {args.workers} workers, in {seconds:.1f}s: writer process "
            f"{1000 * own / summary.written:.2f} ms CPU per image, workers {1000 * workers / summary.written:.2f} ms")
    print("\n" + line)
    return line


if __name__ == "__main__":
    main()
