"""A published cache over HTTP against the cache as built, side by side on loopback: the
requests and bytes to open each and to read one epoch, at 1,024 units per epoch (the scale
benchmark's ImageNet shape: 1,024 shards), and ``logitcache pull`` throughput.

The built cache (format 5, written as a build writes it, random rows, 8 views per unit) is
served by Python's ``http.server``, which lists folders (the only way a Zarr cache reads over
plain HTTP); its published copy (``logitcache publish``) by the same server with listings
off, as static hosting serves it. Every request the server answers is counted; bytes are the
response bodies. Opening a built cache lists ``epochs/``, ``seals/`` and each epoch's commit
records, so its cost grows with the epoch count: the figure at 300 epochs is the measured
per-epoch listing cost times 300 plus the measured rest; the published one is measured.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .common import Ctx, synthetic_unit
from .reader import random_rows

NUM_CLASSES = 1000


def settings(ctx: Ctx) -> dict:
    return {"units": ctx.pick(quick_cpu=1024, full_cpu=1024, quick_cuda=1024, full_cuda=1024, tiny=8),
            "views_per_unit": 8, "epochs": ctx.pick(quick_cpu=2, full_cpu=3, quick_cuda=2, full_cuda=3, tiny=2),
            "k": 10, "values": "gap8", "epochs_at_scale": 300}


class _Counting(http.server.SimpleHTTPRequestHandler):
    log: list[tuple[str, int]]
    listings: bool

    def send_head(self):
        if not self.listings and os.path.isdir(self.translate_path(self.path)):
            self.send_error(404, "not a file")
            return None
        return super().send_head()

    def copyfile(self, source, outputfile):
        data = source.read()
        self.log.append((self.path, len(data)))
        outputfile.write(data)

    def list_directory(self, path):
        out = super().list_directory(path)
        if out is not None:
            self.log.append((self.path, len(out.getvalue())))
        return out

    def send_error(self, code, message=None, explain=None):
        self.log.append((self.path, 0))
        super().send_error(code, message, explain)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def _server(root: Path, listings: bool):
    log: list[tuple[str, int]] = []
    handler = type("H", (_Counting,), {"log": log, "listings": listings})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()


def _build(url: str, s: dict) -> None:
    """A format 5 cache of ``epochs`` epochs x ``units`` units, written as a build writes it."""
    from logitcache.codecs.logits import create_codec
    from logitcache.storage.writer import CacheWriter

    from .common import synthetic_manifest

    codec = create_codec("topk", NUM_CLASSES, s["k"], s["values"])
    n, u = s["views_per_unit"], s["units"]
    writer = CacheWriter(url, synthetic_manifest(n * u, [n] * u, codec))
    writer.prepare_epochs(list(range(s["epochs"])))
    for e in range(s["epochs"]):
        for shard in range(u):
            unit = synthetic_unit(n, shard * n, seed=e * u + shard)
            writer.write_unit(e, shard, random_rows(codec, n, np.random.default_rng([e, shard])), unit["plan"],
                              canary=unit["canary"])
        writer.seal_if_complete(e)


def _measure(url: str, log: list, epochs: int) -> dict:
    """Requests and bytes to open the cache and list its epochs, then to read each epoch."""
    from logitcache.storage.reader import CacheReader

    log.clear()
    t0 = time.perf_counter()
    reader = CacheReader(url)
    assert reader.epochs() == list(range(epochs))
    opened = {"requests": len(log), "bytes": sum(b for _, b in log), "s": time.perf_counter() - t0}
    reads = []
    for e in range(epochs):
        log.clear()
        t0 = time.perf_counter()
        reader.load_epoch(e)
        reads.append({"requests": len(log), "bytes": sum(b for _, b in log), "s": time.perf_counter() - t0})
    return {"open": opened, "epochs": reads}


def run(ctx: Ctx) -> dict:
    from logitcache.storage.publish import publish_cache
    from logitcache.storage.pull import pull_cache

    s = settings(ctx)
    root = ctx.workdir
    t0 = time.perf_counter()
    _build(str(root / "built.zarr"), s)
    build_s = time.perf_counter() - t0
    publish_s = time.perf_counter()
    out = publish_cache(str(root / "built.zarr"), str(root / "published"), progress=False)
    publish_s = time.perf_counter() - publish_s
    with _server(root, listings=True) as (base, log):
        built = _measure(f"{base}/built.zarr", log, s["epochs"])
    with _server(root, listings=False) as (base, log):
        published = _measure(f"{base}/published", log, s["epochs"])
        t0 = time.perf_counter()
        pulled = pull_cache(f"{base}/published", str(root / "pulled"), progress=False)
        pull_s = time.perf_counter() - t0
    # the built cache's open: a constant part, then one commits/ listing per epoch
    per_epoch_listing = 1
    built_open_at_scale = built["open"]["requests"] + per_epoch_listing * (s["epochs_at_scale"] - s["epochs"])
    median = lambda xs: float(np.median(xs))  # noqa: E731
    b_req = median([r["requests"] for r in built["epochs"]])
    p_req = median([r["requests"] for r in published["epochs"]])
    return {
        "settings": s,
        "results": {"built": built, "published": published, "build_s": build_s, "publish_s": publish_s,
                    "published_bytes": out["bytes"], "pull": {**pulled, "s": pull_s}},
        "summary": {
            "published_open_requests": published["open"]["requests"],
            "built_open_requests": built["open"]["requests"],
            "built_open_requests_300_epochs_est": built_open_at_scale,
            "published_requests_per_epoch": p_req,
            "built_requests_per_epoch": b_req,
            "requests_per_epoch_ratio": b_req / p_req,
            "published_bytes_per_epoch": median([r["bytes"] for r in published["epochs"]]),
            "built_bytes_per_epoch": median([r["bytes"] for r in built["epochs"]]),
            "published_epoch_read_s": median([r["s"] for r in published["epochs"]]),
            "built_epoch_read_s": median([r["s"] for r in built["epochs"]]),
            "pull_mb_per_s": pulled["bytes"] / 1e6 / pull_s,
        },
    }


def markdown(data: dict) -> str:
    s, r, m = data["settings"], data["results"], data["summary"]
    rows = [
        ("open the cache and list its epochs, requests", f"{m['built_open_requests']:,}",
         f"{m['published_open_requests']:,}"),
        (f"the same at {s['epochs_at_scale']} epochs, requests",
         f"{m['built_open_requests_300_epochs_est']:,} (est.)", f"{m['published_open_requests']:,}"),
        ("read one epoch, requests", f"{m['built_requests_per_epoch']:,.0f}",
         f"{m['published_requests_per_epoch']:,.0f}"),
        ("read one epoch, bytes", f"{m['built_bytes_per_epoch']:,.0f}", f"{m['published_bytes_per_epoch']:,.0f}"),
        ("read one epoch over loopback, s", f"{m['built_epoch_read_s']:.2f}", f"{m['published_epoch_read_s']:.3f}"),
    ]
    lines = [
        f"{s['units']:,} units per epoch of {s['views_per_unit']} views (top-{s['k']} {s['values']}, "
        f"C = {NUM_CLASSES}), {s['epochs']} epochs built as a build writes them, then published "
        f"(`logitcache publish`); both served over loopback HTTP by Python's http.server, the built cache "
        f"with folder listings (how a Zarr cache reads over plain HTTP), the published one without (static "
        f"hosting). Every request and response body counted (bench/published.py). The built cache's open at "
        f"{s['epochs_at_scale']} epochs adds one listing per epoch to the measured open.",
        "",
        "| | cache as built (listings) | published (no listing) |",
        "|---|---:|---:|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"Per epoch read: **{m['requests_per_epoch_ratio']:,.0f}x fewer requests** published. `logitcache pull` of "
        f"the published copy over loopback: {r['pull']['fetched']} files, {r['pull']['bytes']:,} bytes in "
        f"{r['pull']['s']:.2f} s ({m['pull_mb_per_s']:.1f} MB/s, every file checked against its sha256).",
    ]
    return "\n".join(lines)


def plot(data: dict, outdir) -> list[str]:
    return []
