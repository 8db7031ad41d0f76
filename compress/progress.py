"""What the user sees while work happens: one line per step with its duration, bars for long loops.

Everything goes to stderr so stdout stays clean for machine-readable output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")
LOG_EVERY_S = 30.0  # off a terminal, a loop that runs longer than this prints where it is at most this often


class Console:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._rich = RichConsole(stderr=True, highlight=False, soft_wrap=True)

    def print(self, message: str) -> None:
        if not self.quiet:
            self._rich.print(message)

    @contextmanager
    def step(self, title: str) -> Iterator[dict]:
        """Print `title`, run the block, print how long it took. The block may add a `detail`."""
        info: dict = {}
        self.print(f"[bold]▸[/bold] {title} …")
        start = time.perf_counter()
        try:
            yield info
        except BaseException:
            self.print(f"[red]✗[/red] {title} failed after {time.perf_counter() - start:.1f} s")
            raise
        info["seconds"] = time.perf_counter() - start
        detail = f": {info['detail']}" if info.get("detail") else ""
        self.print(f"[green]✓[/green] {title} ({info['seconds']:.1f} s){detail}")

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        """A progress bar over `items` on a terminal. Off one (CI logs) a long loop prints `k/N (elapsed)` lines
        instead, at most every LOG_EVERY_S and once at its end; a short one prints nothing."""
        if self.quiet:
            yield from items
            return
        if not self._rich.is_terminal:
            n = total if total is not None else len(items)  # type: ignore[arg-type]
            start = last = time.perf_counter()
            for done, item in enumerate(items, 1):
                yield item
                now = time.perf_counter()
                if now - last >= LOG_EVERY_S or (done == n and now - start >= LOG_EVERY_S):
                    self.print(f"  {description}: {done}/{n} ({now - start:.0f} s)")
                    last = now
            return
        columns = (TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self._rich, transient=True) as bar:
            task = bar.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
            for item in items:
                yield item
                bar.advance(task)

    @contextmanager
    def meter(self, description: str, total: int, start: int = 0) -> Iterator[Callable[[int, str], None]]:
        """A bar for a long loop with a live status (loss, tok/s): yields `update(completed, status)`.

        Off a terminal (CI logs) it prints a line at every tenth of the way instead.
        """
        if self.quiet:
            yield lambda completed, status: None
            return
        if not self._rich.is_terminal:
            every = max(1, total // 10)

            def log(completed: int, status: str) -> None:
                if completed % every == 0 or completed == total:
                    self.print(f"  {description} {completed}/{total}: {status}")
            yield log
            return
        columns = (TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[status]}"))
        with Progress(*columns, console=self._rich, transient=True) as bar:
            task = bar.add_task(description, total=total, completed=start, status="")
            yield lambda completed, status: bar.update(task, completed=completed, status=status)
