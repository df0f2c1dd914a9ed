"""Fetch an image reference: a plain path, a file:// URL or an http(s) URL.

Every way a fetch can go wrong maps to one short reason string (the
`reason` of `FetchError`), so failures.jsonl can be grouped and counted:
missing_file, empty_file, unreadable_file, too_large, http_<status>,
timeout, connection_refused, connection_error, bad_redirect, opt_out.

Opt-out is respected: a response whose X-Robots-Tag carries a refusing directive
(img2dataset's list by default: noai, noimageai, noindex, noimageindex; for every
agent, or for vlp's by name) is not used: `opt_out`, never retried. The
User-Agent names vlp (and `--user-agent-token`).

`--timeout` bounds a request as a whole: connecting, the headers and every
byte of the body, so a server that drips bytes (of its headers or of its
body) cannot hold a row past it; it must be finite and positive.
Redirects are followed to http(s) URLs only. Host names are resolved once per process
(vlp.core.dns).
"""

from __future__ import annotations

import email.utils
import errno
import functools
import heapq
import http.client
import itertools
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from vlp.core import dns, storage
from vlp.core.errors import RowFailure

USER_AGENT = "vlp-shards/0.1 (image-text dataset builder)"


class FetchError(RowFailure):
    """A failure of this stage; `reason` is one of the codes in the module docstring."""


class RetryLater(Exception):  # noqa: N818 (not an error: a request to be called again)
    """The host asked for time (429 or 503 with Retry-After): try the row again after `seconds`, as attempt
    `attempt`. Raised only when the caller schedules retries itself (data_tools/politeness.py)."""

    def __init__(self, seconds: float, attempt: int):
        super().__init__(f"retry after {seconds:g} s")
        self.seconds, self.attempt = seconds, attempt


# img2dataset's default: responses whose X-Robots-Tag carries one of these are not used (the site opts out)
DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")


@dataclass(frozen=True)
class FetchOptions:
    timeout: float = 10.0
    retries: int = 2
    max_bytes: int = 50_000_000
    disallowed: tuple[str, ...] = DISALLOWED_DIRECTIVES  # X-Robots-Tag directives that refuse the image
    user_agent_token: str | None = None  # named in the User-Agent; directives for it ("tok: noai") apply too

    @property
    def user_agent(self) -> str:
        return USER_AGENT + (f" {self.user_agent_token}" if self.user_agent_token else "")


def is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


def local_path(ref: str, base_dir: str) -> Path:
    """A plain path (relative to the input file's folder) or a file:// URL -> a path."""
    if ref.startswith("file://"):
        return Path(unquote(urlparse(ref).path))
    path = Path(ref).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


def _read_local(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise FetchError("missing_file", f"{path} is not a file")
        if size == 0:
            raise FetchError("empty_file", str(path))
        if size > max_bytes:
            raise FetchError("too_large", f"{size} bytes > {max_bytes}")
        return path.read_bytes()
    except FileNotFoundError:
        raise FetchError("missing_file", str(path)) from None
    except PermissionError:
        raise FetchError("unreadable_file", f"permission denied: {path}") from None
    except OSError as err:
        raise FetchError("unreadable_file", f"{path}: {err.strerror}") from None


def _is_timeout(err: BaseException) -> bool:
    return isinstance(err, TimeoutError | socket.timeout) or (
        isinstance(err, OSError) and err.errno == errno.ETIMEDOUT
    )


def _classify(err: BaseException) -> FetchError:
    """Map an exception from urllib into one reason."""
    if isinstance(err, urllib.error.HTTPError) and 300 <= err.code < 400:  # urllib refused the redirect
        return FetchError("bad_redirect", f"http_{err.code}: {err.reason}")
    if isinstance(err, urllib.error.HTTPError):
        return FetchError(f"http_{err.code}", str(err.reason))
    inner = err.reason if isinstance(err, urllib.error.URLError) else err
    if _is_timeout(inner):
        return FetchError("timeout", "no response in time")
    if isinstance(inner, ConnectionRefusedError):
        return FetchError("connection_refused", str(inner))
    return FetchError("connection_error", str(inner))


def _transient(err: FetchError) -> bool:
    """Worth retrying: server errors, rate limits and network trouble; not 4xx."""
    if err.reason.startswith("http_"):
        code = int(err.reason[5:])
        return code >= 500 or code == 429
    return err.reason in ("timeout", "connection_error", "connection_refused")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only: never to file://, ftp:// or any other scheme."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urlparse(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError("bad_redirect", f"redirect to a {scheme or 'relative'}:// URL refused")
        follow = super().redirect_request(req, fp, code, msg, headers, newurl)
        if follow is not None:  # the redirected request runs on the same clock
            follow.deadline = req.deadline
        return follow


class _Deadline:
    """One request's whole time: when it is up, every socket the request opened is shut down, which
    ends whatever read is waiting on it (headers dripped a byte at a time included: a per-read socket
    timeout would never fire on those)."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds
        self.expired = False
        self.done = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def __enter__(self) -> _Deadline:
        _WATCHDOG.add(self)
        return self

    def __exit__(self, *exc) -> None:
        self.done = True

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0 or self.expired:
            raise TimeoutError("the whole request took longer than its timeout")
        return left

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shut(sock)

    def expire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed
            pass


class _Watchdog:
    """One thread per process expires every request's deadline when it is due. A timer thread per
    request (64 fetch threads start hundreds a second) cost more CPU than the request itself."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, _Deadline]] = []  # a heap; finished ones leave when they reach the top
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, deadline: _Deadline) -> None:
        with self._changed:
            heapq.heappush(self._due, (deadline.at, next(self._order), deadline))
            if self._thread is None or not self._thread.is_alive():  # first use in this process
                self._thread = threading.Thread(target=self._run, name="fetch-deadlines", daemon=True)
                self._thread.start()
            if self._due[0][2] is deadline:  # sooner than what the thread sleeps towards
                self._changed.notify()

    def _run(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                while self._due and (self._due[0][2].done or self._due[0][0] <= now):
                    heapq.heappop(self._due)[2].expire()  # a no-op for a finished request
                self._changed.wait(self._due[0][0] - now if self._due else None)


_WATCHDOG = _Watchdog()


class _Watched:
    """An HTTP(S) connection on a request's deadline: connecting gets what time is left, and the connected
    socket is handed to the deadline. Host names are resolved once per process (vlp.core.dns)."""

    def __init__(self, *args, deadline: _Deadline, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline
        self._create_connection = dns.create_connection

    def connect(self) -> None:
        self.timeout = self.deadline.remaining()
        super().connect()
        self.deadline.watch(self.sock)


class _WatchedHTTP(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, http.client.HTTPSConnection):
    pass


class _DeadlineHTTP(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTP, deadline=req.deadline), req)


class _DeadlineHTTPS(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTPS, deadline=req.deadline), req, context=self._context)


_OPENER: urllib.request.OpenerDirector | None = None


def _opener() -> urllib.request.OpenerDirector:
    """One opener per process, shared by the fetch threads (as urlopen's is): building one per request cost
    more CPU than the request. Each request carries its own deadline."""
    global _OPENER
    if _OPENER is None:
        _OPENER = urllib.request.build_opener(_HttpOnlyRedirects, _DeadlineHTTP, _DeadlineHTTPS)
    return _OPENER


def _read_http(url: str, opts: FetchOptions) -> bytes:
    """GET url within `opts.timeout` seconds in all (connect, headers and body), at most max_bytes."""
    with _Deadline(opts.timeout) as deadline:
        try:
            return _read_http_within(url, opts, deadline)
        except FetchError:
            raise
        except Exception:
            if deadline.expired:  # whatever the shut socket raised (a reset, a short read): the time ran out
                raise TimeoutError("the whole request took longer than its timeout") from None
            raise


def _read_http_within(url: str, opts: FetchOptions, deadline: _Deadline) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": opts.user_agent})
    request.deadline = deadline
    with _opener().open(request, timeout=deadline.remaining()) as resp:
        refused = opted_out(resp.headers.get_all("X-Robots-Tag") or [], opts)
        if refused:
            raise FetchError("opt_out", f"X-Robots-Tag: {refused}")
        declared = resp.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > opts.max_bytes:
            raise FetchError("too_large", f"{declared} bytes > {opts.max_bytes}")
        sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
        # read1 returns what has arrived (read(n) would wait for all n bytes), so a
        # server dripping a byte at a time cannot hold the row past the deadline.
        parts, size = [], 0
        while True:
            if sock is not None:
                sock.settimeout(deadline.remaining())
            piece = resp.read1(1 << 20)
            if not piece:
                break
            parts.append(piece)
            size += len(piece)
            if size > opts.max_bytes:
                raise FetchError("too_large", f"more than {opts.max_bytes} bytes")
            deadline.remaining()
        deadline.remaining()  # a socket shut by the deadline reads as the end: that body is not whole
        data = b"".join(parts)
    if not data:
        raise FetchError("empty_file", "empty response body")
    return data


def opted_out(values: list[str], opts: FetchOptions) -> str | None:
    """The first refusing X-Robots-Tag directive that applies to us, or None.

    A value is comma-separated directives; one may be meant for a named agent only
    ("googlebot: noindex"): it applies when the name is vlp's (`vlp`, or the user agent token)."""
    ours = {"vlp", (opts.user_agent_token or "").lower()} - {""}
    for value in values:
        agent = None
        for part in value.split(","):
            part = part.strip()
            if ":" in part:
                agent, part = (x.strip() for x in part.split(":", 1))
            if part.lower() in opts.disallowed and (agent is None or agent.lower() in ours):
                return f"{agent + ': ' if agent else ''}{part}"
    return None


def retry_after(err: BaseException) -> float | None:
    """Seconds a 429 or 503 response asks to wait (its Retry-After: seconds or an HTTP date), else None."""
    if not isinstance(err, urllib.error.HTTPError) or err.code not in (429, 503) or err.headers is None:
        return None
    value = (err.headers.get("Retry-After") or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when is not None else None


def _fetch_http(url: str, opts: FetchOptions, attempt: int = 0, defer: bool = False) -> bytes:
    """GET with retries of transient failures; with `defer`, a Retry-After is RetryLater for the caller's
    scheduler instead of a sleep here (a thread that sleeps holds a slot other hosts could use)."""
    while True:
        try:
            return _read_http(url, opts)
        except FetchError:
            raise
        except Exception as err:  # urllib raises a zoo: HTTPError, URLError, OSError, http.client errors
            failure, wait = _classify(err), retry_after(err)
        if attempt >= opts.retries or not _transient(failure):
            raise failure
        attempt += 1
        if defer and wait is not None:
            raise RetryLater(wait, attempt)
        time.sleep(min(0.2 * 2**attempt, 2.0))  # short backoff: a build is long, a stall is costly


def fetch(ref: str, base_dir: str, opts: FetchOptions, attempt: int = 0, defer: bool = False) -> bytes:
    """The bytes behind ref, or FetchError(reason). A relative ref in an object-storage input is a key
    under the input's prefix. `attempt`, `defer`: see _fetch_http (http(s) only)."""
    if "://" not in ref and storage.is_object_url(base_dir) and not ref.startswith("/"):
        ref = storage.join(base_dir, ref)
    if is_url(ref):
        return _fetch_http(ref, opts, attempt, defer)
    if storage.is_object_url(ref):
        return _read_object(ref, opts.max_bytes)
    if "://" in ref and not ref.startswith("file://"):
        raise FetchError("unsupported_scheme", ref.split("://", 1)[0])
    return _read_local(local_path(ref, base_dir), opts.max_bytes)


def _read_object(url: str, max_bytes: int) -> bytes:
    """An object-storage image: its size checked before its bytes are read. The client library retries
    throttling (503 Slow Down) and resets with backoff; what still fails is this row's failure."""
    try:
        size = storage.info(url)["size"]
        if size == 0:
            raise FetchError("empty_file", url)
        if size is not None and size > max_bytes:
            raise FetchError("too_large", f"{size} bytes > --max-bytes {max_bytes}")
        return storage.read_bytes(url)
    except FetchError:
        raise
    except FileNotFoundError:
        raise FetchError("missing_file", url) from None
    except Exception as err:  # UserError from storage (one line), or a client error mid-read
        raise FetchError("storage_error", str(err)[:300]) from None


def suffix_of(ref: str) -> str:
    """The file extension of a reference ('.jpg'), ignoring URL queries."""
    path = urlparse(ref).path if "://" in ref else ref
    return os.path.splitext(path)[1].lower()
