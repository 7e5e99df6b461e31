"""A preloaded ``logitcache`` for tests that start builds (a helper; not collected by pytest).

Importing torch, timm and zarr takes most of a tiny build's time. This process imports
them once, then for each JSON line on stdin forks a child that runs ``logitcache <args>``
(logitcache.cli.main.main, the console script's function) with ``env`` added to its environment and
its output discarded; it prints the child's pid, waits for it and prints its status::

    -> {"args": ["build", "--data", ...], "write_delay": 0.01, "env": {"AWS_...": "..."}}
    <- pid 12345
    <- status -9        (negative: killed by that signal; else the exit code)

``write_delay`` > 0 delays every file write of zarr's LocalStore by that many seconds,
so that writing a unit lasts long enough for a kill to land inside it. Nothing here opens
a store or runs a torch op before forking.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logitcache.cli.main  # noqa: E402
import logitcache.build.loop  # noqa: E402,F401  (torch, timm, zarr: the slow imports)
import logitcache.build.teacher  # noqa: E402,F401
from zarr.storage import _local  # noqa: E402

_put = _local._put


def _child(args: list[str], write_delay: float, env: dict[str, str]) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.environ.update(env)
    if write_delay > 0:
        def slow_put(path, value, exclusive=False):
            time.sleep(write_delay)
            return _put(path, value, exclusive=exclusive)

        _local._put = slow_put
    sys.argv = ["logitcache"] + args
    code = 0
    try:
        logitcache.cli.main.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001
        code = 1
    os._exit(code)


def serve() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(msg["args"], float(msg.get("write_delay", 0)), msg.get("env", {}))
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"status {code}", flush=True)


if __name__ == "__main__":
    print("ready", flush=True)
    serve()
