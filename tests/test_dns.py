"""Host names resolved once per process (vlp.core.dns): a build over many images of one host asks the
resolver once, a name that does not resolve is asked once too, and every row is still accounted for.

The host is `localhost` (resolved from /etc/hosts, no traffic leaves the machine) in front of the loopback
test server; the resolver calls are counted by wrapping socket.getaddrinfo, which still does the lookup.
"""

from __future__ import annotations

import socket
import threading
import time

from http_server import serve
from shard_helpers import build, failures, noise_image, save, write_csv

from vlp.core import dns


def test_one_lookup_per_host_for_a_whole_build(tmp_path, monkeypatch):
    real = socket.getaddrinfo
    asked: list[str] = []

    def counting(host, *args, **kwargs):
        asked.append(host)
        if host == "unresolvable.test":  # what a resolver answers for a name that does not exist
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", counting)
    dns.clear()
    for i in range(6):
        save(noise_image(32, 32, seed=i), tmp_path / "www" / f"{i}.jpg", quality=90)
    with serve(tmp_path / "www") as (base, hits):
        port = base.rsplit(":", 1)[1]
        rows = [{"url": f"http://localhost:{port}/{i % 6}.jpg", "caption": f"image {i}"} for i in range(24)]
        rows += [{"url": f"http://unresolvable.test:{port}/{i}.jpg", "caption": "nowhere"} for i in range(5)]
        summary = build([write_csv(tmp_path / "pairs.csv", rows)], tmp_path / "out", threads=4, retries=0,
                        dedup=False)
    assert (summary.written, summary.failed) == (24, 5)
    assert sum(hits.values()) == 24
    assert asked.count("localhost") == 1 and asked.count("unresolvable.test") == 1
    assert {f["reason"] for f in failures(tmp_path / "out")} == {"connection_error"}


def test_threads_needing_one_name_at_once_wait_for_a_single_lookup(monkeypatch):
    """A build's threads start together and all need the first host: one asks, the others wait for its answer
    (before, each missed the cache and asked). A lookup that fails with something other than a resolver error
    caches nothing and leaves no lookup registered: the next call asks again."""
    asked: list[str] = []

    def slow(host, *args, **kwargs):
        asked.append(host)
        time.sleep(0.2)  # every thread reaches the cache before the first answer comes
        if host == "broken.test":
            raise UnicodeError("label too long")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))]

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    dns.clear()
    start = threading.Barrier(8)
    answers = []

    def one() -> None:
        start.wait()
        answers.append(dns.resolve("localhost", 80))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert asked == ["localhost"] and len(answers) == 8 and all(a == answers[0] for a in answers)
    for _ in range(2):
        try:
            dns.resolve("broken.test", 80)
        except UnicodeError:
            pass
    assert asked.count("broken.test") == 2  # not cached, and the second call did not wait forever
