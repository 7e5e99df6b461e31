"""What a build reports (:class:`BuildReport`: views, the rate of each stage, the one that
bounds it) and its progress bar (:class:`BuildProgress`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BuildReport:
    """What a build did, and how fast each of its two stages ran (seconds are wall time)."""

    url: str
    units_written: int = 0
    units_skipped: int = 0
    views: int = 0
    seconds: float = 0.0
    workers: int = 0  # DataLoader workers that rendered the views (0: the main process did)
    render_seconds: float = 0.0  # summed over batches: reading and rendering, in the workers
    teacher_seconds: float = 0.0  # summed over batches: the teacher's forward and its logit check

    @property
    def views_per_s(self) -> float:
        return self.views / self.seconds if self.seconds > 0 else 0.0

    @property
    def render_views_per_s(self) -> float:
        """What the renderers together deliver: views / render seconds x the workers rendering
        at once (with 0 workers the main process renders between teacher calls)."""
        return self.views / self.render_seconds * max(self.workers, 1) if self.render_seconds > 0 else 0.0

    @property
    def teacher_views_per_s(self) -> float:
        return self.views / self.teacher_seconds if self.teacher_seconds > 0 else 0.0

    @property
    def bound_by(self) -> str:
        """The slower stage, "rendering" or "teacher": what to add (workers or a faster device)."""
        return "rendering" if self.render_views_per_s < self.teacher_views_per_s else "teacher"


class BuildProgress:
    """A rich progress bar (views, views/s, units, ETA), or nothing when disabled."""

    def __init__(self, enabled: bool, total_views: int, total_units: int):
        self.enabled, self.total_views, self.total_units, self.units = enabled, total_views, total_units, 0

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.p = Progress(
                TextColumn("[bold]build[/]"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("units {task.fields[units]}"), TimeRemainingColumn(),
            )
            self.p.__enter__()
            self.task = self.p.add_task("build", total=self.total_views, rate="", units=f"0/{self.total_units}")
        return self

    def advance(self, n: int) -> None:
        if self.enabled:
            self.p.advance(self.task, n)
            speed = self.p.tasks[0].speed
            self.p.update(self.task, rate=f"{speed:,.0f} views/s" if speed else "")

    def unit_done(self) -> None:
        self.units += 1
        if self.enabled:
            self.p.update(self.task, units=f"{self.units}/{self.total_units}")

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
        return False
