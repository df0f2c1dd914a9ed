"""Per-host politeness: how a worker's fetch threads share the hosts its rows point at.

A crawl's rows cluster on a few hosts (a CDN, a stock-photo site), and a host that is hit
too hard answers 429, blocks the crawler or files an abuse report. So within each worker
process the rows are scheduled by host:

- at most `concurrency` requests to one host at once, and with `rate`, at most that many
  request starts per second to it;
- a 429 or 503 with `Retry-After` delays that host's rows (up to `max_retry_after` seconds),
  not the thread: the thread takes another host's row meanwhile, so one slow or hostile host
  never holds slots the others could use. The row is tried again after the delay (it counts
  as one of its retries);
- rows that are not http(s) URLs (files, object storage) are one unlimited "host".

Limits are per worker process: the build divides `--host-concurrency` and `--host-rate` by its
worker count. Results come back in row order, so the output does not depend on scheduling.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlparse

from vlp.core.fetch import RetryLater


@dataclass(frozen=True)
class HostLimits:
    concurrency: int = 16  # requests to one host at once
    rate: float = 0.0  # request starts per second to one host (0: no limit)
    max_retry_after: float = 60.0  # a longer Retry-After is shortened to this


def host_of(ref: str) -> str | None:
    """The host a row's image is fetched from (None: not an http(s) URL, never limited)."""
    ref = ref.strip()
    if not ref.lower().startswith(("http://", "https://")):
        return None
    try:
        return (urlparse(ref).hostname or "").lower() or None
    except ValueError:
        return None


@dataclass
class _Host:
    queue: deque = field(default_factory=deque)  # (index in the chunk, attempt)
    active: int = 0
    next_start: float = 0.0  # the rate limit's next free moment
    not_before: float = 0.0  # Retry-After


class Scheduler:
    """Run work(index, attempt) for every index with `threads` threads under the host limits; `work` raises
    RetryLater to have the index run again later, its host paused."""

    def __init__(self, limits: HostLimits, pool: ThreadPoolExecutor, threads: int):
        self.limits, self.pool, self.threads = limits, pool, threads

    def run(self, hosts: list[str | None], work: Callable[[int, int], object]) -> list:
        self.hosts: dict[str | None, _Host] = {}
        for i, host in enumerate(hosts):
            self.hosts.setdefault(host, _Host()).queue.append((i, 0))
        self.results: list = [None] * len(hosts)
        self.left = len(hosts)
        self.cond = threading.Condition()
        self.turn = 0  # round robin over hosts, so none starves
        workers = [self.pool.submit(self._loop, work) for _ in range(min(self.threads, len(hosts)))]
        for w in workers:
            w.result()
        for result in self.results:
            if isinstance(result, Exception):
                raise result
        return self.results

    def _loop(self, work: Callable[[int, int], object]) -> None:
        while (job := self._take()) is not None:
            host, i, attempt = job
            try:
                result, delay = work(i, attempt), None
            except RetryLater as later:
                result, delay = None, (min(later.seconds, self.limits.max_retry_after), later.attempt)
            except Exception as err:  # work reports failures as results; this is a bug: end the chunk with it
                result, delay = err, None
            self._done(host, i, result, delay)

    def _take(self) -> tuple[str | None, int, int] | None:
        with self.cond:
            while True:
                if self.left == 0:
                    return None
                now = time.monotonic()
                names = list(self.hosts)
                wait = None
                for k in range(len(names)):
                    name = names[(self.turn + k) % len(names)]
                    h = self.hosts[name]
                    if not h.queue or (name is not None and h.active >= self.limits.concurrency):
                        continue
                    ready = max(h.next_start, h.not_before) if name is not None else 0.0
                    if ready <= now:
                        i, attempt = h.queue.popleft()
                        h.active += 1
                        if name is not None and self.limits.rate > 0:
                            h.next_start = now + 1.0 / self.limits.rate
                        self.turn = (self.turn + k + 1) % len(names)
                        return name, i, attempt
                    wait = ready - now if wait is None else min(wait, ready - now)
                self.cond.wait(timeout=wait)  # a host becomes ready, or a slot frees (notify)

    def _done(self, host: str | None, i: int, result, delay: tuple[float, int] | None) -> None:
        with self.cond:
            h = self.hosts[host]
            h.active -= 1
            if delay is None:
                self.results[i] = result
                self.left -= 1
            else:
                seconds, attempt = delay
                h.not_before = max(h.not_before, time.monotonic() + seconds)
                h.queue.appendleft((i, attempt))
            self.cond.notify_all()
