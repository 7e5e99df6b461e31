"""Run a graph of tasks, ``jobs`` processes at a time, each task once its dependencies are done.

:class:`concurrent.futures.ProcessPoolExecutor` runs the tasks; this module only decides
which task goes next (the first ready one in list order), hands it its dependencies'
results, and records failures: a task that raises, or whose dependency failed, has the
result ``{"error": ...}`` and the other tasks go on.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import traceback
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Task:
    key: tuple
    deps: list[tuple]
    fn: Callable[..., dict]  # a module-level function: the pool pickles it by name
    make_args: Callable[[dict], tuple]  # finished results (key -> result) -> positional args of fn
    label: str


OnDone = Callable[[Task, dict], None]


def init_process(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _error(exc: BaseException) -> dict:
    tb = "".join(traceback.format_exception(exc, limit=8))
    return {"error": f"{type(exc).__name__}: {exc}\n{tb}"}


class _Graph:
    """The tasks not started yet, and every finished one's result."""

    def __init__(self, tasks: list[Task], on_done: OnDone):
        self.pending = list(tasks)
        self.done: dict = {}
        self.on_done = on_done

    def results(self) -> dict:
        if self.pending:  # a dependency that is no task would leave them waiting for ever
            raise ValueError(f"tasks wait on dependencies that never run: {[t.key for t in self.pending]}")
        return self.done

    def finish(self, task: Task, result: dict) -> None:
        self.done[task.key] = result
        self.on_done(task, result)

    def next_ready(self) -> Task | None:
        """The first pending task whose dependencies are all done and none failed (one whose
        dependency failed is finished as failed on the way); None when none is ready."""
        while True:
            task = next((t for t in self.pending if all(d in self.done for d in t.deps)), None)
            if task is None:
                return None
            self.pending.remove(task)
            failed = [d for d in task.deps if "error" in self.done[d]]
            if not failed:
                return task
            self.finish(task, {"error": f"dependency failed: {failed}"})


def schedule(tasks: list[Task], jobs: int, threads: int, on_done: OnDone) -> dict:
    """Run ``tasks`` (first ready in list order), ``jobs`` at a time (in-process when 1), each
    process with ``threads`` torch threads. Returns key -> result or {"error": ...}."""
    graph = _Graph(tasks, on_done)
    if jobs <= 1:
        init_process(threads)
        while (task := graph.next_ready()) is not None:
            try:
                result = task.fn(*task.make_args(graph.done))
            except Exception as exc:  # noqa: BLE001 - record, go on with the other runs
                result = _error(exc)
            graph.finish(task, result)
        return graph.results()

    import torch

    # fork (cheap) unless the caller already initialised CUDA, which a forked child cannot use
    method = "spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "fork"
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context(method), initializer=init_process,
                                initargs=(threads,)) as pool:
        running: dict[cf.Future, Task] = {}
        while True:
            while len(running) < jobs and (task := graph.next_ready()) is not None:
                running[pool.submit(task.fn, *task.make_args(graph.done))] = task
            if not running:
                return graph.results()
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                task = running.pop(fut)
                try:
                    result = fut.result()
                except Exception as exc:  # noqa: BLE001 - record, go on with the other runs
                    result = _error(exc)
                graph.finish(task, result)
