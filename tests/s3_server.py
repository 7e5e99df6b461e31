"""A real S3-compatible server for tests: moto's server mode on 127.0.0.1 and a free port.

    with s3_server() as env:          # env: the AWS_* variables pointing at it
        subprocess.run([...], env={**os.environ, **env})

Clients find it through AWS_ENDPOINT_URL (botocore >= 1.31 reads it, and so do s3fs and
everything built on it, zarr included); credentials are dummies.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # No ~/.aws config or instance metadata lookups from the test machine.
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """Start moto's threaded server; yield the environment that points clients at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import s3fs

    # fsspec reuses one S3FileSystem per set of arguments, and the endpoint comes from the
    # environment, not the arguments: an instance made for an earlier server would be reused
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield s3_env(f"http://127.0.0.1:{port}")
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


class RequestCount(logging.Handler):
    """How many HTTP requests the in-process server handled (it logs one line per request)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.count = 0
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def count_requests() -> Iterator[RequestCount]:
    """Count the requests an :func:`s3_server` in this process serves inside the block."""
    counter = RequestCount()
    werkzeug = logging.getLogger("werkzeug")
    level, handlers = werkzeug.level, werkzeug.handlers[:]
    werkzeug.handlers[:] = [counter]  # count the request lines instead of printing them
    werkzeug.setLevel(logging.INFO)
    try:
        yield counter
    finally:
        werkzeug.setLevel(level)
        werkzeug.handlers[:] = handlers
