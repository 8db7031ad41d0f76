"""Budgets and the gate: what a target promises, checked against what verification measured, in one place.

A budget names a metric and a bound (`max_mean_kl: 0.05` is mean_kl <= 0.05). A metric this machine cannot
measure (latency of a Core ML program on Linux) is "not measured": it neither passes nor fails, and the
verdict says so. The orchestrator turns a failed verdict into exit code 4.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from compress.config import check_fields, setting


class Bound(enum.StrEnum):
    MAX = "max"
    MIN = "min"


class Verdict(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"
    UNVERIFIED = "unverified"  # built with --no-verify


@dataclass(frozen=True)
class Budget:
    """How a budget name maps onto a measured metric."""

    metric: str
    bound: Bound
    unit: str = ""


BUDGETS: dict[str, Budget] = {
    "max_mean_kl": Budget("mean_kl", Bound.MAX, "nats"),
    "max_p99_kl": Budget("p99_kl", Bound.MAX, "nats"),
    "min_top1_agreement": Budget("top1_agreement", Bound.MIN),
    "max_perplexity_ratio": Budget("perplexity_ratio", Bound.MAX),
    "min_greedy_match": Budget("greedy_match_mean", Bound.MIN, "tokens"),
    "max_size_mb": Budget("size_mb", Bound.MAX, "MB"),
    "min_decode_tok_s": Budget("decode_tok_s", Bound.MIN, "tok/s"),
    "min_prefill_tok_s": Budget("prefill_tok_s", Bound.MIN, "tok/s"),
    "max_peak_rss_mb": Budget("peak_rss_mb", Bound.MAX, "MB"),
    "max_itl_p95_ms": Budget("itl_p95_ms", Bound.MAX, "ms"),
}


@dataclass(frozen=True)
class Budgets:
    max_mean_kl: float | None = setting(None, ge=0)
    max_p99_kl: float | None = setting(None, ge=0)
    min_top1_agreement: float | None = setting(None, ge=0, le=1)
    max_perplexity_ratio: float | None = setting(None, gt=0)
    min_greedy_match: float | None = setting(None, ge=0)
    max_size_mb: float | None = setting(None, gt=0)
    min_decode_tok_s: float | None = setting(None, gt=0)
    min_prefill_tok_s: float | None = setting(None, gt=0)
    max_peak_rss_mb: float | None = setting(None, gt=0)
    max_itl_p95_ms: float | None = setting(None, gt=0)  # the slowest decode steps an app's UI waits on

    def __post_init__(self) -> None:
        check_fields(self)

    def items(self) -> list[tuple[str, float]]:
        """The budgets that are set, in a fixed order."""
        return [(name, getattr(self, name)) for name in BUDGETS if getattr(self, name) is not None]


@dataclass(frozen=True)
class BudgetResult:
    name: str  # e.g. "max_mean_kl"
    metric: str  # e.g. "mean_kl"
    limit: float
    value: float | None  # None: not measured on this machine (see `note`)
    passed: bool | None  # None: not measured, so neither passed nor failed
    margin: float | None  # headroom: positive passes, negative fails
    unit: str = ""
    note: str = ""

    def status(self) -> str:
        return "not measured" if self.passed is None else ("pass" if self.passed else "FAIL")


def check_budgets(budgets: Budgets, metrics: dict[str, float], unmeasured: dict[str, str]) -> list[BudgetResult]:
    """Every budget that is set, with value, limit, margin and verdict."""
    results = []
    for name, limit in budgets.items():
        rule = BUDGETS[name]
        value = metrics.get(rule.metric)
        if value is None:
            note = unmeasured.get(rule.metric, "metric not measured")
            results.append(BudgetResult(name, rule.metric, limit, None, None, None, rule.unit, note))
            continue
        margin = limit - value if rule.bound is Bound.MAX else value - limit
        results.append(BudgetResult(name, rule.metric, limit, value, margin >= 0, margin, rule.unit))
    return results


def verdict(results: list[BudgetResult], strict: bool = False) -> Verdict:
    """FAIL when a budget is broken, or (`strict`) when one could not be measured here."""
    failed = any(r.passed is False or (strict and r.passed is None) for r in results)
    return Verdict.FAIL if failed else Verdict.PASS


def broken_summary(results: list[BudgetResult], strict: bool = False) -> str:
    """`name: metric = value, limit L` for every broken budget (and, `strict`, every unmeasured one), joined: the
    one-line failure message."""
    broken = [f"{b.name}: {b.metric} = {b.value:.4g}, limit {b.limit:.4g}" for b in results if b.passed is False]
    if strict:
        broken += [f"{b.name}: not measured here ({b.note}; --strict)" for b in results if b.passed is None]
    return "; ".join(broken)
