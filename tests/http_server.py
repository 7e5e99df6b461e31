"""A static HTTP server on loopback for tests: files only (a folder is 404, as on static
hosting: object-storage websites, CDNs, release assets), every request recorded."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
from typing import Iterator


class _StaticHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def send_head(self):
        if os.path.isdir(self.translate_path(self.path)):  # no listings, no index.html
            self.send_error(404, "not a file")
            return None
        return super().send_head()

    def do_GET(self):
        self.requests.append(f"GET {self.path}")
        super().do_GET()

    def do_HEAD(self):
        self.requests.append(f"HEAD {self.path}")
        super().do_HEAD()

    def log_message(self, *args) -> None:  # quiet
        pass


@contextlib.contextmanager
def static_server(root: str) -> Iterator[tuple[str, list[str]]]:
    """Serve ``root``; yields (its base URL, the list every request is appended to)."""
    requests: list[str] = []
    handler = type("Handler", (_StaticHandler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
