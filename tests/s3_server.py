"""A real S3 API on loopback for tests: moto's server, plus a proxy that misbehaves like S3 under load.

`S3Server` runs moto's standalone server (`moto.server.ThreadedMotoServer`) on
127.0.0.1 and a thin proxy in front of it. Clients are pointed at the proxy with the
usual AWS environment variables (`env()`), so vlp, s3fs and webdataset's subprocesses
reach it exactly as they would reach AWS. The proxy counts requests per (method,
path) and can answer `503 Slow Down` for the next N requests (a 503 storm), or for
all of them, the way S3 throttles a prefix, or cut a GET's body short (a dropped connection).
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
from moto.server import ThreadedMotoServer

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class S3Server:
    def __init__(self) -> None:
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.hits: Counter = Counter()
        self.throttle = 0  # answer 503 to this many coming requests (-1: to all) ...
        self.throttle_prefix = "/"  # ... whose path starts with this (e.g. "/bucket/images/")
        self.cut_after = 0  # > 0: the next GET's body is cut off (connection closed) after this many bytes
        self._lock = threading.Lock()
        self.proxy: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> S3Server:
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        self.proxy = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(self, host, port))
        self.proxy.daemon_threads = True
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.shutdown()
            self.proxy.server_close()
        self.moto.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.proxy.server_address[1]}"

    def env(self) -> dict[str, str]:
        """The environment that points AWS clients (and vlp's subprocesses) here."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_MAX_ATTEMPTS": "4", "AWS_RETRY_MODE": "standard"}

    def client(self):
        env = self.env()
        return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def reset(self) -> None:
        """Empty every bucket (moto's reset API) and forget the counts."""
        conn = http.client.HTTPConnection(*self.moto.get_host_and_port(), timeout=10)
        conn.request("POST", "/moto-api/reset")
        conn.getresponse().read()
        self.hits.clear()
        self.throttle, self.throttle_prefix, self.cut_after = 0, "/", 0

    def gets(self, suffix: str = "") -> int:
        """GET requests so far to paths ending in `suffix` (ranged reads included)."""
        return sum(n for (method, path), n in self.hits.items() if method == "GET" and path.endswith(suffix))

    def _take_cut(self) -> int:
        with self._lock:
            cut, self.cut_after = self.cut_after, 0
            return cut

    def _take_throttle(self, path: str) -> bool:
        with self._lock:
            if self.throttle == 0 or not path.startswith(self.throttle_prefix):
                return False
            if self.throttle > 0:
                self.throttle -= 1
            return True


def _proxy_handler(server: S3Server, host: str, port: int):
    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _forward(self) -> None:
            path = self.path.split("?", 1)[0]
            server.hits[(self.command, path)] += 1
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if server._take_throttle(path):
                return self._reply(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
            conn = http.client.HTTPConnection(host, port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self._reply(resp.status, {k: v for k, v in resp.getheaders() if k.lower() not in HOP_HEADERS}, data,
                        head=self.command == "HEAD", length=resp.getheader("Content-Length"))
            conn.close()

        def _reply(self, status: int, headers: dict, data: bytes, head: bool = False, length: str | None = None):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", length if head and length else str(len(data)))
            self.end_headers()
            if head:
                return
            cut = server._take_cut() if self.command == "GET" else 0
            if 0 < cut < len(data):  # a connection dropped mid-body: the client sees a short read
                self.wfile.write(data[:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815 - the http.server API

    return Proxy
