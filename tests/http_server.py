"""A static HTTP server on loopback for tests: files only (a folder is 404, as on static
hosting: object-storage websites, CDNs, release assets), every request recorded."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
import time
from typing import Iterator


class _StaticHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]
    faults: dict[str, list[str]]  # URL path -> the faults of its next GETs, in order (see static_server)

    def send_head(self):
        if os.path.isdir(self.translate_path(self.path)):  # no listings, no index.html
            self.send_error(404, "not a file")
            return None
        return super().send_head()

    def do_GET(self):
        self.requests.append(f"GET {self.path}")
        pending = self.faults.get(self.path)
        fault = pending.pop(0) if pending else None
        if fault is None or os.path.isdir(self.translate_path(self.path)):
            return super().do_GET()
        if fault == "503":
            return self.send_error(503, "try again")
        if fault == "slow":  # answers late (a big file on a slow link): time to kill a client mid-pull
            time.sleep(20)
            return super().do_GET()
        with open(self.translate_path(self.path), "rb") as f:
            body = f.read()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault == "flip":  # one byte changed in transit: the first, so that the change is the same every run
            body = bytes([body[0] ^ 0x01]) + body[1:]
        elif fault == "truncate":  # the connection closes half-way through the body
            body = body[:len(body) // 2]
        elif fault == "drop":  # the connection closes right after the headers
            body = b""
        self.wfile.write(body)
        self.close_connection = fault in ("truncate", "drop")

    def do_HEAD(self):
        self.requests.append(f"HEAD {self.path}")
        super().do_HEAD()

    def log_message(self, *args) -> None:  # quiet
        pass


@contextlib.contextmanager
def static_server(root: str, faults: dict[str, list[str]] | None = None) -> Iterator[tuple[str, list[str]]]:
    """Serve ``root``; yields (its base URL, the list every request is appended to).

    ``faults``: URL path -> what its next GETs do, one entry per request: "503" (an error
    status), "drop" (headers, then the connection closes), "truncate" (half the body, then
    the connection closes), "flip" (the whole body, its first byte changed), "slow" (served after
    20 s). Later GETs are served."""
    requests: list[str] = []
    handler = type("Handler", (_StaticHandler,), {"requests": requests, "faults": faults if faults is not None else {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
