"""Per-host politeness with hostile hosts on loopback: a limit per host, Retry-After pauses the host and not
the build, a hanging host does not slow the others, every row is accounted for.

The hosts are loopback addresses of their own (127.0.0.1, 127.0.0.2, 127.0.0.3): a host is what a URL names.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from shard_helpers import build, noise_image, save, write_csv
from vlp.data_tools.politeness import HostLimits, Scheduler, host_of

from vlp.core.fetch import RetryLater


class _Host:
    """A server on one loopback address: serves one PNG after `delay` seconds (or 429 + Retry-After, or never),
    counting requests and the most it ever had in flight at once.

    In flight, as the client sees it: from the request's arrival until just before the response's last bytes
    are sent (the client cannot finish a request earlier) or until the client hangs up (a hanging host's
    requests end at the client's deadline, which the server notices only when it next looks). So each arrival
    first drops the connections whose client has gone: the count never includes a request the client has
    already given up, which a count decremented when the handler returns did, by a few milliseconds."""

    def __init__(self, address: str, png: bytes, mode: str = "ok", delay: float = 0.0):
        self.png, self.mode, self.delay = png, mode, delay
        self.lock = threading.Lock()
        self.active: set[socket.socket] = set()
        self.most = self.requests = 0
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def done(self) -> None:
                with host.lock:
                    host.active.discard(self.connection)

            def do_GET(self) -> None:
                with host.lock:
                    host.active -= {c for c in host.active if _hung_up(c)}
                    host.requests += 1
                    host.active.add(self.connection)
                    host.most = max(host.most, len(host.active))
                try:
                    if host.mode == "hang":  # never answers; gone when the client hangs up (its deadline)
                        end = time.monotonic() + 30
                        while time.monotonic() < end:
                            readable, _, _ = select.select([self.connection], [], [], 0.05)
                            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                                return
                        return
                    time.sleep(host.delay)
                    if host.mode == "429":
                        self.send_response(429)
                        self.send_header("Retry-After", "1")
                        self.send_header("Content-Length", "0")
                        self.done()
                        self.end_headers()
                        return
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(host.png)))
                    self.end_headers()
                    self.done()
                    self.wfile.write(host.png)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    self.done()

        self.server = ThreadingHTTPServer((address, 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://{address}:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _hung_up(connection: socket.socket) -> bool:
    """The client closed this connection (a zero-byte peek); a request's bytes already read leave nothing."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and not connection.recv(1, socket.MSG_PEEK)
    except OSError:
        return True


@contextmanager
def hosts(tmp_path: Path, *specs: tuple[str, str, float]):
    save(noise_image(16, 16, seed=3), tmp_path / "a.png")
    png = (tmp_path / "a.png").read_bytes()
    made = [_Host(address, png, mode, delay) for address, mode, delay in specs]
    try:
        yield made
    finally:
        for h in made:
            h.close()


def test_host_of_names_http_hosts_only():
    assert host_of(" https://CDN.example.com:8443/a.jpg") == "cdn.example.com"
    assert host_of("images/a.png") is None and host_of("s3://bucket/a.png") is None


def test_the_scheduler_keeps_each_hosts_limit_and_returns_results_in_order():
    limits = HostLimits(concurrency=2)
    lock, in_flight, most = threading.Lock(), {"a": 0, "b": 0}, {"a": 0, "b": 0}
    names = ["a", "b"] * 10 + [None] * 4

    def work(i: int, attempt: int) -> int:
        name = names[i]
        if name is not None:
            with lock:
                in_flight[name] += 1
                most[name] = max(most[name], in_flight[name])
        time.sleep(0.02)
        if name is not None:
            with lock:
                in_flight[name] -= 1
        return i * 10

    with ThreadPoolExecutor(8) as pool:
        results = Scheduler(limits, pool, 8).run(names, work)
    assert results == [i * 10 for i in range(len(names))]
    assert most == {"a": 2, "b": 2}


def test_retry_after_pauses_the_host_and_the_threads_serve_the_others():
    """Host "slow" asks for 0.5 s on its first request; meanwhile the one thread does host "fast"'s rows."""
    started: list[tuple[str, float]] = []
    names = ["slow"] + ["fast"] * 5
    t0 = time.monotonic()

    def work(i: int, attempt: int) -> str:
        started.append((names[i], time.monotonic() - t0))
        if names[i] == "slow" and attempt == 0:
            raise RetryLater(0.5, 1)
        return f"{names[i]}:{attempt}"

    with ThreadPoolExecutor(1) as pool:
        results = Scheduler(HostLimits(), pool, 1).run(names, work)
    assert results == ["slow:1"] + ["fast:0"] * 5
    assert [n for n, _ in started] == ["slow", "fast", "fast", "fast", "fast", "fast", "slow"]
    assert started[-1][1] >= 0.5  # the pause was kept; the other host's rows went first, without waiting


def test_the_rate_limit_spaces_a_hosts_request_starts():
    starts: list[float] = []

    def work(i: int, attempt: int) -> int:
        starts.append(time.monotonic())
        return i

    with ThreadPoolExecutor(4) as pool:
        Scheduler(HostLimits(concurrency=4, rate=20.0), pool, 4).run(["h"] * 6, work)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert min(gaps) >= 0.045  # 20 per second: 50 ms apart (a little scheduling slack)


@pytest.mark.slow
def test_a_429_host_and_a_hanging_host_do_not_hold_up_the_others_and_every_row_is_accounted(tmp_path):
    with hosts(tmp_path, ("127.0.0.1", "ok", 0.05), ("127.0.0.2", "429", 0.0), ("127.0.0.3", "hang", 0.0)) as (
            good, limited, hanging):
        rows = [{"url": f"{good.base}/{i}.png", "caption": f"good {i}"} for i in range(120)]
        rows += [{"url": f"{limited.base}/{i}.png", "caption": f"limited {i}"} for i in range(6)]
        rows += [{"url": f"{hanging.base}/{i}.png", "caption": f"hanging {i}"} for i in range(4)]
        summary = build([write_csv(tmp_path / "p.csv", rows)], tmp_path / "out", workers=1, threads=8, retries=2,
                        timeout=3.0, host_concurrency=3, dedup=False)
    assert summary.rows == 130 and summary.written == 120 and summary.failed == 10
    reasons: dict[str, set] = {}
    for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines():
        entry = json.loads(line)
        reasons.setdefault(host_of(entry["url"]), set()).add(entry["reason"])
    assert reasons == {"127.0.0.2": {"http_429"}, "127.0.0.3": {"timeout"}}
    assert good.most <= 3 and limited.most <= 3 and hanging.most <= 3  # never more than the limit at once
    assert limited.requests == 6 * 3  # each row: its first try and two retries, each after the host's pause
