"""Errors a user can act on. Each maps to one documented exit code; the CLI prints one line."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1
    BAD_INPUT = 2
    EXPORT_FAILED = 3
    BUDGET_BROKEN = 4
    RUNTIME_UNAVAILABLE = 5
    INTERRUPTED = 130


class CompressError(Exception):
    """Base class: `str(err)` is the one-line message the CLI prints."""

    exit_code: ExitCode = ExitCode.INTERNAL


class InputError(CompressError):
    """A model source, data file, output directory or flag the user gave is unusable."""

    exit_code = ExitCode.BAD_INPUT


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a config: where it is, what was found, what is allowed."""

    where: str  # e.g. "targets.yaml: targets.android.budgets.max_mean_kl"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class ConfigError(InputError):
    """One or more problems in a config; all of them are reported together."""

    def __init__(self, problems: list[Problem] | Problem | str):
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"{len(self.problems)} problems:"] + [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class ExportError(CompressError):
    exit_code = ExitCode.EXPORT_FAILED


class NotAvailableYet(ExportError):
    """A target names a component (exporter, stage) that this version does not implement."""


class RuntimeUnavailable(CompressError):
    exit_code = ExitCode.RUNTIME_UNAVAILABLE


class BudgetBroken(CompressError):
    exit_code = ExitCode.BUDGET_BROKEN


class VerificationFailed(BudgetBroken):
    """The artifact's own runtime refused it (a damaged file that still matches its manifest, say): gated like a
    broken budget."""
