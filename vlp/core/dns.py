"""Host names resolved once per process: a build asks the resolver once per host, not once per image.

A web-scale build fetches many images from each host; each fetch resolving the name again puts
a load on the system resolver that img2dataset's users meet as DNS timeouts (they are told to run
a local caching resolver). Here each process keeps what `getaddrinfo` answered for a host and
port for `TTL` seconds, failures included (for `NEGATIVE_TTL`: a name that does not resolve costs
one lookup, not one per row). Connections try the addresses in order, as socket.create_connection does.
"""

from __future__ import annotations

import socket
import threading
import time

TTL = 300.0
NEGATIVE_TTL = 60.0

_cache: dict[tuple[str, int], tuple[float, list | socket.gaierror]] = {}
_asking: dict[tuple[str, int], threading.Event] = {}  # lookups under way: other threads wait for their answer
_lock = threading.Lock()


def resolve(host: str, port: int) -> list[tuple]:
    """getaddrinfo(host, port, TCP) from the process's cache (a gaierror is cached and raised again). Threads
    that need the same name at once wait for the one lookup under way instead of asking too."""
    key = (host, port)
    while True:
        with _lock:
            hit = _cache.get(key)
            if hit is not None and hit[0] >= time.monotonic():
                break
            under_way = _asking.get(key)
            if under_way is None:
                _asking[key] = threading.Event()
        if under_way is None:
            hit = _look_up(key)
            break
        under_way.wait()  # then read the cache again (a lookup that raised something else left nothing there)
    if isinstance(hit[1], socket.gaierror):
        raise hit[1]
    return hit[1]


def _look_up(key: tuple[str, int]) -> tuple[float, list | socket.gaierror]:
    """Ask the resolver (this thread registered the lookup in _asking), cache the answer, wake the waiters."""
    try:
        try:
            answer: list | socket.gaierror = socket.getaddrinfo(*key, 0, socket.SOCK_STREAM)
            expires = time.monotonic() + TTL
        except socket.gaierror as err:
            answer, expires = err, time.monotonic() + NEGATIVE_TTL
        with _lock:
            _cache[key] = (expires, answer)
        return expires, answer
    finally:
        with _lock:
            _asking.pop(key).set()


def create_connection(address: tuple[str, int], timeout: float | None = None,
                      source_address: tuple[str, int] | None = None) -> socket.socket:
    """socket.create_connection with the addresses from `resolve` (http.client's `_create_connection`)."""
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, target in resolve(host, port):
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not None:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(target)
            return sock
        except OSError as err:
            error = err
            sock.close()
    raise error or OSError(f"no address for {host}")


def clear() -> None:
    """Forget every answer (tests)."""
    with _lock:
        _cache.clear()
