"""What the console prints off a terminal (CI logs): long loops say where they are, short ones stay silent."""

from __future__ import annotations

import io

import pytest
from rich.console import Console as RichConsole

from compress import progress


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    console = progress.Console()
    buffer = io.StringIO()
    console._rich = RichConsole(file=buffer, force_terminal=False, width=200)
    return console, buffer, clock


def test_a_long_loop_off_a_terminal_prints_where_it_is_and_its_end(logged):
    console, buffer, clock = logged
    for _ in console.track(range(16), "GPTQ, layer by layer"):
        clock[0] += 12.0  # each item takes 12 s
    lines = buffer.getvalue().splitlines()
    # a line once 30 s have passed since the last one (items 3, 6, 9, 12, 15), then the end
    assert lines == [f"  GPTQ, layer by layer: {k}/16 ({12 * k} s)" for k in (3, 6, 9, 12, 15, 16)]


def test_a_short_loop_off_a_terminal_prints_nothing(logged):
    console, buffer, clock = logged
    for _ in console.track(list(range(100)), "Quantizing 100 linears"):
        clock[0] += 0.1
    assert buffer.getvalue() == ""
