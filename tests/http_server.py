"""A real HTTP server on loopback for tests that fetch URLs.

Serves files from a folder, plus special paths that misbehave the ways the
web does: /status/404, /status/500, /slow/<seconds>/<file> (answers late),
/flaky/<n>/<file> (500 for the first n requests, then the file), and the
ways a hostile server does: /drip/<seconds per byte>/<file> (the body a byte
at a time, for as long as the client listens), /driphead/<seconds per byte>/<file>
(the status line and headers a byte at a time), /robots/<X-Robots-Tag>/<file>
(the file with that opt-out header), /endless (a body without
end), /redirect/<scheme>/<rest> (302 to <scheme>://<rest>).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _handler(root: Path, hits: Counter):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _send(self, code: int, body: bytes = b"") -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _stream(self, parts: list[str]) -> None:
            """A hostile body: one byte per `parts[1]` seconds of a file (drip), or zeros without end."""
            drip = parts[0] == "drip"
            body = root.joinpath(*parts[2:]).read_bytes() if drip else b""
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)) if drip else str(10**12))
            self.end_headers()
            deadline = time.monotonic() + 60  # the server gives up on its own: no test can hang on it
            try:
                i = 0
                while time.monotonic() < deadline and (not drip or i < len(body)):
                    self.wfile.write(body[i : i + 1] if drip else b"\0" * 65536)
                    self.wfile.flush()
                    i += 1
                    if drip:
                        time.sleep(float(parts[1]))
            except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                pass

        def _drip_head(self, seconds: float, body: bytes) -> None:
            """Headers that never finish in time: a byte every `seconds`, for at most 60 s."""
            head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Padding: {'x' * 200}\r\n"
            head += f"Content-Length: {len(body)}\r\n\r\n"
            deadline = time.monotonic() + 60
            try:
                for byte in head.encode():
                    if time.monotonic() > deadline:
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(seconds)
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                pass

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            hits[self.path] += 1
            parts = self.path.strip("/").split("/")
            if parts[0] == "status":
                return self._send(int(parts[1]), b"error page")
            if parts[0] == "redirect":
                self.send_response(302)
                self.send_header("Location", f"{parts[1]}://{'/'.join(parts[2:])}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if parts[0] in ("drip", "endless"):
                return self._stream(parts)
            if parts[0] == "driphead":
                return self._drip_head(float(parts[1]), root.joinpath(*parts[2:]).read_bytes())
            if parts[0] == "robots":  # /robots/<X-Robots-Tag value, URL-quoted>/<file>
                from urllib.parse import unquote

                body = root.joinpath(*parts[2:]).read_bytes()
                self.send_response(200)
                self.send_header("X-Robots-Tag", unquote(parts[1]))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return None
            if parts[0] == "slow":
                time.sleep(float(parts[1]))
                parts = parts[2:]
            elif parts[0] == "flaky":
                if hits[self.path] <= int(parts[1]):
                    return self._send(500, b"try again")
                parts = parts[2:]
            path = root.joinpath(*parts)
            if not path.is_file():
                return self._send(404, b"not found")
            try:
                self._send(200, path.read_bytes())
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                pass

    return Handler


@contextmanager
def serve(root: Path):
    """Yield (base_url, hits) for a server on 127.0.0.1 with a free port."""
    hits: Counter = Counter()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(Path(root), hits))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    """A loopback port with nothing listening (connection refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
