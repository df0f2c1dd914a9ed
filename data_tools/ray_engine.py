"""`vlp shards build --engine ray`: the worker processes of a build, on a Ray cluster.

Why this shape: a build's output depends only on its input and options
because one process (this one, the driver) numbers the rows and writes
everything in row order: keys, shard rollover, deduplication across the whole
build, resume. Ray replaces only the worker processes. `RayWorkers` has the
local pool's contract (`map(chunks)` yields `(chunk, results)` in order, with a
bounded window): each chunk of rows is a Ray task running `process_chunk`,
placed by this process on the node with the fewest unfinished chunks per CPU
(a faster node gets more), 4 chunks per CPU of the cluster are in flight, and
the results come back in row order to the same writer. So a Ray build writes
byte for byte the files a local build writes, every row is accounted, and a
build started with one engine resumes with either.

- A worker or node that dies mid-task: Ray reruns the task (`max_retries`);
  nothing is lost or written twice, since only the driver writes. A chunk
  whose worker still dies is then processed row by row, each row a task of
  its own without retries, so only a row that really kills its process fails
  (worker_crashed), as with the local engine.
- The workers read the images themselves, so on a multi-node cluster the
  rows' images must be http(s) URLs, in object storage (with credentials on
  every node) or on a shared filesystem mounted at the same path on every
  node. Before work starts (and at the first chunk of each further input, for
  up to MAX_PROBES inputs), a probe on every node reads a sample of the
  images on disk or in object storage that the rows name and compares them
  with what this machine reads, along with the vlp and Pillow versions (the
  encoded bytes depend on Pillow): any difference is a one-line error, not a
  build that quietly differs by node.
- Relative paths resolve as in a local build, against this process's working
  directory: each task changes into it (where it exists on the node).
- The cluster: --ray-address, else $RAY_ADDRESS, else a new Ray instance on
  this machine with --workers CPUs (shut down at the end, as is a connection
  this build made; a killed build's instance is ended by the next build that
  starts one). An address nothing answers at is a one-line error within
  seconds (a TCP check first), one that answers but is no Ray head within
  CONNECT_TIMEOUT_S: Ray alone retries for minutes.
- The driver is the single writer: its write and dedup rate bounds the build.
- On a node that offers Ray every core it may use, each worker process that runs chunks stays on a
  core of its own (vlp.core.processes.take_core), as the local engine's workers do (--no-pin-workers: not).

`import ray` happens only inside functions: Ray is an optional extra (vlp[ray]).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import PIL
from vlp.data_tools.output import private_dir, remove_stale
from vlp.data_tools.pipeline import RowOptions, RowResult, process_chunk
from vlp.data_tools.readers import Row

import vlp
from vlp.core.atomic import write_atomic
from vlp.core.errors import RowFailure, UserError, first_line
from vlp.core.fetch import FetchOptions, fetch, is_url
from vlp.core.processes import take_core

MAX_RETRIES = 3  # Ray reruns a task whose worker or node died this many times
WINDOW_PER_CPU = 4  # chunks in flight per CPU of the cluster, finished ones waiting for their turn included
NODE_QUEUE_PER_CPU = 2  # unfinished chunks placed on a node per CPU: one running, one ready to start
# connecting to a running cluster (a TCP check first: an unreachable one fails fast); VLP_RAY_CONNECT_TIMEOUT
CONNECT_TIMEOUT_S = float(os.environ.get("VLP_RAY_CONNECT_TIMEOUT", "60"))
PROBE_TIMEOUT_S = 300.0  # every node answers the reachability probe (a node may start a worker first)
PROBE_FILES = 16  # images sampled per probe
MAX_PROBES = 32  # probes of further inputs during a build
TASK_NAME = "vlp_shards_chunk"
INSTALL = "pip install 'vlp[ray]'"


def ray_module():
    """`import ray`, or a one-line error naming the extra to install."""
    return _ray()


def disconnect(started: bool) -> None:
    """End what `connect` started (a connection, or the local instance and its record); leave a caller's own."""
    if started:
        _ray().shutdown()
        _forget_processes()


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"--engine ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


# ------------------------------------------------------------ what runs on the nodes


def _enter(cwd: str) -> None:
    """Resolve relative paths as the driver does (a worker starts in its node's own folder)."""
    if os.getcwd() != cwd and os.path.isdir(cwd):
        os.chdir(cwd)


def _run_chunk(rows: list[Row], opts: RowOptions, cwd: str, node_cpus: int | None = None) -> list[RowResult]:
    _enter(cwd)
    take_core(node_cpus)
    return process_chunk(rows, opts)


def _look(refs: list[tuple[str, str]], cwd: str, opts: FetchOptions) -> dict:
    """What this process sees: versions, and each image's size and sha256 (or its failure reason)."""
    _enter(cwd)
    seen = []
    for ref, base_dir in refs:
        try:
            data = fetch(ref, base_dir, opts)
            seen.append(f"{len(data)} bytes (sha256 {hashlib.sha256(data).hexdigest()[:16]})")
        except RowFailure as err:
            seen.append(err.reason)
    return {"versions": {"vlp": vlp.__version__, "Pillow": PIL.__version__}, "images": seen}


# ------------------------------------------------------------ connecting


def _check_reachable(address: str) -> None:
    """A TCP connection to the head first: Ray itself retries an unreachable address for minutes."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves those itself, and fails fast
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise UserError(f"--ray-address {address}: no Ray cluster reachable there ({why}); "
                        f"start one with `ray start --head` or check the address") from None


def _init(ray, timeout: float, **kwargs) -> None:
    """ray.init, bounded in time: Ray retries an address that answers but is no Ray head for minutes.

    It runs in a side thread, which only connects (a local instance is started in the main
    thread instead: Ray's processes die with the thread that started them). This also keeps
    Ray from installing its own SIGTERM handler in this process.
    """
    done: dict = {}

    def run() -> None:
        try:
            ray.init(**kwargs)
            done["ok"] = True
        except BaseException as err:
            done["error"] = err

    thread = threading.Thread(target=run, name="ray-init", daemon=True)
    with _quiet_stderr() as noise:
        thread.start()
        thread.join(timeout)
    if done.get("ok"):
        sys.stderr.write("".join(noise))  # usually nothing (Ray logs errors only)
    if thread.is_alive():
        _silence_fd2_keep_sys_stderr()
        raise UserError(f"--ray-address {kwargs['address']}: no answer from Ray within {timeout:.0f}s")
    if "error" in done:
        raise _connect_error(kwargs["address"], done["error"])


@contextlib.contextmanager
def _quiet_stderr():
    """Ray's core logs every failed connection attempt to file descriptor 2: hold that back.

    Yields a list that holds what was written, once the block is over.
    """
    sys.stderr.flush()
    saved, held = os.dup(2), []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            held.append(sink.read().decode(errors="replace"))


def _silence_fd2_keep_sys_stderr() -> None:
    """The stuck ray.init thread keeps logging to fd 2 until this process exits: send fd 2 to
    /dev/null and Python's sys.stderr (our one-line error) to a copy of the real stderr."""
    sys.stderr.flush()
    real = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = open(real, "w", buffering=1)  # noqa: SIM115 - lives as long as the process


def _connect_error(address: str, err: BaseException) -> BaseException:
    if isinstance(err, KeyboardInterrupt | UserError):
        return err
    first = first_line(err)
    return UserError(f"--ray-address {address}: cannot connect to Ray ({first})")


def connect(address: str | None, num_cpus: int) -> bool:
    """Connect to the cluster at `address` (else $RAY_ADDRESS, else start one here); True if this call did."""
    ray = _ray()
    if ray.is_initialized():
        return False  # the caller's own connection (a notebook, a script): used as it is, and left open
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address:
        _check_reachable(address)
        _init(ray, CONNECT_TIMEOUT_S, address=address, **quiet)
        return True
    remove_stale("ray", _reap)  # what a killed build's instance left running goes first
    try:  # "local": a new instance even when another one runs on this machine
        ray.init(address="local", num_cpus=max(1, num_cpus), include_dashboard=False, **quiet)
    except Exception as err:
        first = first_line(err)
        raise UserError(f"--engine ray: cannot start a local Ray instance ({first})") from None
    _record_processes()
    return True


# ------------------------------------------------------------ a killed build's local instance

PROCESSES = "processes.json"
_RECORD: Path | None = None  # this process's record of the instance it started


def _record_processes() -> None:
    """The local instance's processes (this process's descendants: raylet, GCS, agents, workers), each
    with its start time, in a folder named after this process. Ray stops most of them when this
    process dies, but its agents poll for minutes before they notice; the next build ends them."""
    import psutil

    global _RECORD
    procs = [{"pid": p.pid, "started": p.create_time()} for p in psutil.Process().children(recursive=True)]
    _RECORD = private_dir("ray")
    write_atomic(_RECORD / PROCESSES, json.dumps(procs))  # whole or absent, for whoever reads it


def _forget_processes() -> None:
    """The instance was shut down: nothing to end later."""
    global _RECORD
    if _RECORD is not None:
        shutil.rmtree(_RECORD, ignore_errors=True)
        _RECORD = None


def _reap(folder: Path) -> None:
    """Kill the processes a dead build recorded that still run (the same pid and start time: never a
    process that reused the number)."""
    import psutil

    try:
        procs = json.loads((folder / PROCESSES).read_text())
    except (OSError, ValueError):
        return
    for rec in procs if isinstance(procs, list) else []:
        try:
            proc = psutil.Process(int(rec["pid"]))
            if abs(proc.create_time() - float(rec["started"])) < 0.01:
                proc.kill()
        except (psutil.Error, KeyError, TypeError, ValueError):
            continue


# ------------------------------------------------------------ reachability


def _sample(rows: list[Row]) -> list[tuple[str, str]]:
    """Up to PROBE_FILES (ref, base_dir) of images on disks or in object storage: one per folder first.

    Not http(s) URLs: a web server may answer one node and not the next for reasons of its own, and
    such a row is a failure of that row, not a sign of a badly set up node.
    """
    by_dir: dict[str, tuple[str, str]] = {}
    rest: list[tuple[str, str]] = []
    for row in rows:
        ref = (row.ref or "").strip()
        if row.error or not ref or is_url(ref):
            continue
        where = ref if "://" in ref else os.path.join(row.base_dir, ref)
        if os.path.dirname(where) in by_dir:
            rest.append((ref, row.base_dir))
        else:
            by_dir[os.path.dirname(where)] = (ref, row.base_dir)
    return [*by_dir.values(), *rest][:PROBE_FILES]


def _probe(ray, rows: list[Row], opts: RowOptions, cwd: str) -> None:
    """Every node with CPUs must read the sampled images (and have the versions) exactly as this process."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    refs = _sample(rows)
    here = _look(refs, cwd, opts.fetch)
    look = ray.remote(_look)
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    pending = [look.options(num_cpus=0, max_retries=MAX_RETRIES, name="vlp_shards_probe",
                            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
               .remote(refs, cwd, opts.fetch) for n in nodes]
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    for node, answer in zip(nodes, pending, strict=True):
        name = node["NodeManagerAddress"]
        try:
            there = ray.get(answer, timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"--engine ray: node {name} did not run a task within {PROBE_TIMEOUT_S:.0f}s") from None
        except ray.exceptions.RayError as err:
            last = (str(err).strip().splitlines() or [type(err).__name__])[-1]
            raise UserError(f"--engine ray: node {name} cannot run vlp's tasks ({last}); "
                            f"install the same vlp on every node") from None
        if there["versions"] != here["versions"]:
            raise UserError(f"--engine ray: node {name} has {there['versions']}, this machine "
                            f"{here['versions']}; install the same versions everywhere (the images' bytes "
                            f"depend on them)")
        for (ref, base_dir), mine, theirs in zip(refs, here["images"], there["images"], strict=True):
            if mine != theirs:
                shown = ref if "://" in ref or os.path.isabs(ref) else os.path.join(base_dir, ref)
                raise UserError(f"--engine ray: node {name} reads image {shown} as {theirs}, this machine as "
                                f"{mine}; on a multi-node cluster, images must be URLs, in object storage "
                                f"(credentials set on every node) or on a filesystem shared by every node at "
                                f"the same path")


# ------------------------------------------------------------ the engine


class RayWorkers:
    """Ordered, bounded-window map of process_chunk over a Ray cluster (build._Workers' contract).

    Chunks are placed by the driver, not by Ray's strategies: each node holds at most
    NODE_QUEUE_PER_CPU chunks per CPU (running or waiting), and the next chunk goes to the node with
    the fewest per CPU, so a node that finishes sooner is fed sooner. (SPREAD dealt chunks round the
    nodes in turn: the slowest node set the pace of all, since results are written in row order.)
    The placement is soft: a chunk whose node died runs elsewhere. Nodes that join after the start
    are not used by this build.
    """

    def __init__(self, opts: RowOptions, address: str | None, num_cpus: int, pin: bool = False):
        self.opts, self.address, self.num_cpus, self.pin = opts, address, num_cpus, pin

    def map(self, chunks: Iterator[list[Row]]) -> Iterator[tuple[list[Row], list[RowResult]]]:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = _ray()
        started = connect(self.address, self.num_cpus)
        window: deque = deque()  # (chunk, ref) in row order, finished or not
        try:
            cwd = os.getcwd()
            opts = ray.put(self.opts)
            cpus = {n["NodeID"]: int(n["Resources"]["CPU"]) for n in ray.nodes()
                    if n["Alive"] and n["Resources"].get("CPU", 0) >= 1}
            if not cpus:
                raise UserError("--engine ray: no node of the cluster has a whole CPU to run chunks on")
            task = ray.remote(_run_chunk)
            on_node = {node: task.options(max_retries=MAX_RETRIES, name=TASK_NAME,
                                          scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True))
                       for node in cpus}
            queued = dict.fromkeys(cpus, 0)  # chunks on each node not finished yet
            running: dict = {}  # unfinished ref -> its node
            size = WINDOW_PER_CPU * max(1, sum(cpus.values()))
            # before work starts: the nodes must read the first window's images as this machine does
            first = [c for c in (next(chunks, None) for _ in range(size)) if c is not None]
            if not first:
                return  # nothing (left) to do
            _probe(ray, [row for chunk in first for row in chunk], self.opts, cwd)
            probed = {row.source for chunk in first for row in chunk}
            probes = 0
            pending = iter(first)
            while True:
                while len(window) < size:
                    node = min(cpus, key=lambda n: queued[n] / cpus[n])
                    if queued[node] >= NODE_QUEUE_PER_CPU * cpus[node]:
                        break
                    if (chunk := next(pending, None) or next(chunks, None)) is None:
                        break
                    new = {row.source for row in chunk} - probed
                    if new and probes < MAX_PROBES:  # a further input: its folders may be elsewhere
                        _probe(ray, chunk, self.opts, cwd)
                        probes += 1
                    probed |= new
                    ref = on_node[node].remote(chunk, opts, cwd, cpus[node] if self.pin else None)
                    window.append((chunk, ref))
                    running[ref] = node
                    queued[node] += 1
                if not window:
                    return
                chunk, ref = window[0]
                if ref in running:  # the head is not done: wait for any chunk, then place the next
                    done, _ = ray.wait(list(running), num_returns=1)
                    for finished in done:
                        queued[running.pop(finished)] -= 1
                    continue
                window.popleft()
                yield chunk, self._results(ray, chunk, ref, opts, cwd)
        finally:
            for _, ref in window:  # a build that stops early leaves no work behind on the cluster
                try:
                    ray.cancel(ref)
                except Exception:
                    pass
            if started:
                ray.shutdown()
                _forget_processes()

    def _results(self, ray, chunk: list[Row], ref, opts, cwd: str) -> list[RowResult]:
        died = (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError)
        try:
            return ray.get(ref)
        except died:  # the chunk killed its worker MAX_RETRIES + 1 times: find the culprit
            pass
        solo = ray.remote(_run_chunk).options(max_retries=0, name=TASK_NAME)
        refs = [solo.remote([row], opts, cwd) for row in chunk]
        results = []
        for row, one in zip(chunk, refs, strict=True):
            try:
                results.extend(ray.get(one))
            except died:  # as build._crash_results says it
                results.append(RowResult(row.index, "worker_crashed", "the decoder process died on this row"))
        return results
