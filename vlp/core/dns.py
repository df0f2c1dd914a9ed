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
_lock = threading.Lock()


def resolve(host: str, port: int) -> list[tuple]:
    """getaddrinfo(host, port, TCP) from the process's cache (a gaierror is cached and raised again)."""
    key = (host, port)
    now = time.monotonic()
    with _lock:
        hit = _cache.get(key)
    if hit is None or hit[0] < now:
        try:
            answer: list | socket.gaierror = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
            expires = now + TTL
        except socket.gaierror as err:
            answer, expires = err, now + NEGATIVE_TTL
        with _lock:
            _cache[key] = hit = (expires, answer)
    if isinstance(hit[1], socket.gaierror):
        raise hit[1]
    return hit[1]


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
