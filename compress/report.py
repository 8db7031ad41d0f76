"""Reports of a verification: report.md (people), report.json (machines), junit.xml (any CI system).

With GITHUB_STEP_SUMMARY set, the Markdown table is appended to the job summary as well.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

REPORT_MD, REPORT_JSON, JUNIT = "report.md", "report.json", "junit.xml"

_METRIC_ROWS = (
    ("mean_kl", "mean KL (ref || candidate)", "{:.3g}"),
    ("p99_kl", "p99 KL", "{:.3g}"),
    ("top1_agreement", "top-1 agreement", "{:.4f}"),
    ("reference_perplexity", "reference perplexity", "{:.3f}"),
    ("perplexity", "candidate perplexity", "{:.3f}"),
    ("perplexity_ratio", "perplexity ratio", "{:.4f}"),
    ("greedy_match_mean", "greedy tokens matched (mean)", "{:.1f}"),
    ("size_mb", "artifact size (MB)", "{:.1f}"),
    ("load_s", "load time (s)", "{:.2f}"),
    ("ttft_s", "time to first token (s)", "{:.3f}"),
    ("prefill_tok_s", "prefill (tok/s)", "{:.1f}"),
    ("decode_tok_s", "decode (tok/s)", "{:.1f}"),
    ("itl_p50_ms", "inter-token latency p50 (ms)", "{:.1f}"),
    ("itl_p95_ms", "inter-token latency p95 (ms)", "{:.1f}"),
    ("peak_rss_mb", "peak RSS of the runtime process (MB)", "{:.0f}"),
)


def _fmt(value: float | None, pattern: str = "{:.6g}") -> str:
    return "n/a" if value is None else pattern.format(value)


def render_markdown(v: dict[str, Any], title: str, stages: list[dict[str, Any]] = ()) -> str:
    """The verification's tables; `stages` (the manifest's stage records) adds the quantize stage's measured
    bits-vs-KL points when it searched mixed precision."""
    verdict = "PASS" if v["passed"] else "FAIL"
    m = v["metrics"]
    lines = [f"## {title}: {verdict}", ""]
    lines += ["| budget | value | limit | margin | result |", "|---|---|---|---|---|"]
    for b in v["budgets"]:
        status = "not measured" if b["passed"] is None else ("pass" if b["passed"] else "**FAIL**")
        note = f" ({b['note']})" if b.get("note") else ""
        lines.append(f"| {b['name']} | {_fmt(b['value'])} | {_fmt(b['limit'])} | {_fmt(b['margin'])} | "
                     f"{status}{note} |")
    if not v["budgets"]:
        lines.append("| (no budgets set) | | | | |")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {label} | {_fmt(m.get(key), fmt)} |" for key, label, fmt in _METRIC_ROWS if key in m]
    es, mo = v["eval_set"], v["measured_on"]
    lines += ["", f"Evaluation: {es['windows']} windows x {es['window_len']} tokens of `{es['source']}` "
                  f"({m.get('positions', 0)} positions), {es['prompts']} prompts x "
                  f"{int(m.get('greedy_tokens', 0))} greedy tokens.",
              f"Runtime `{v['runtime']}`, {v['threads']} threads; measured on {mo['cpu']} "
              f"({mo['logical_cores']} logical cores, {mo['os']}). CI latency is not phone latency.", ""]
    lines += _bound(v.get("bound"))
    if v.get("greedy_samples"):
        lines += ["### Greedy samples", "", "| prompt | reference | candidate | matched |", "|---|---|---|---|"]
        for s in v["greedy_samples"]:
            lines.append(f"| {_cell(s['prompt'])} | {_cell(s['reference'])} | {_cell(s['candidate'])} | "
                         f"{s['match']} |")
        lines.append("")
    lines += _bits_vs_kl(stages)
    return "\n".join(lines)


def _bound(bound: dict[str, Any] | None) -> list[str]:
    """The accuracy pass repeated in the runtime's other arithmetic: its metrics, gated above by the same budgets."""
    if not bound:
        return []
    m = bound["metrics"]
    accuracy = ("mean_kl", "p99_kl", "top1_agreement", "reference_perplexity", "perplexity", "perplexity_ratio")
    rows = [(key, label, fmt) for key, label, fmt in _METRIC_ROWS if key in accuracy and key in m]
    return [f"### Bound: {bound['name']}", "",
            (f"The teacher-forced pass again on the first {bound['windows']} windows ({m['positions']} positions), "
             f"with {bound['description']}; {bound['seconds']:.0f} s. The budgets marked "
             f"`({bound['name']} bound)` above gate these numbers."), "",
            "| metric | value |", "|---|---|", *[f"| {label} | {_fmt(m.get(key), fmt)} |" for key, label, fmt in rows],
            ""]


def _bits_vs_kl(stages: list[dict[str, Any]]) -> list[str]:
    notes = next((s["notes"] for s in stages if s["kind"] == "quantize" and "bits_vs_kl" in s["notes"]), None)
    if notes is None:
        return []
    chosen = len(notes["promoted_to_8bit"])
    reached = "met" if notes["max_kl_reached"] else "**not reached: the whole bits budget is spent**"
    lines = ["### Quantize stage: average code bits vs KL", "",
             f"Mixed precision: the most sensitive linears at 8 bits; the stage's KL on its "
             f"{notes['calibration']['windows']} calibration windows (not the evaluation set above). "
             f"max_kl {notes['max_kl']}: {reached}.", "",
             "| linears at 8 bits | average code bits | KL | |", "|---|---|---|---|"]
    for p in notes["bits_vs_kl"]:
        mark = "chosen" if p["linears_at_8bit"] == chosen else ""
        lines.append(f"| {p['linears_at_8bit']} | {p['avg_code_bits']:.3f} | {p['kl']:.4g} | {mark} |")
    return lines + [""]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "⏎")


def render_junit(v: dict[str, Any], suite: str) -> str:
    budgets = v["budgets"]
    failures = sum(1 for b in budgets if b["passed"] is False)
    skipped = sum(1 for b in budgets if b["passed"] is None)
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(budgets)), failures=str(failures),
                       skipped=str(skipped), errors="0")
    for b in budgets:
        case = ET.SubElement(ts, "testcase", classname=suite, name=b["name"])
        if b["passed"] is False:
            msg = f"{b['metric']} = {_fmt(b['value'])}, limit {_fmt(b['limit'])} (margin {_fmt(b['margin'])})"
            ET.SubElement(case, "failure", message=msg, type="BudgetBroken").text = msg
        elif b["passed"] is None:
            ET.SubElement(case, "skipped", message=b.get("note") or "not measured")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def render_failure_junit(suite: str, step: str, err: BaseException) -> str:
    """A build that stopped before its budgets were measured: one errored test case naming the step and why."""
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=suite, tests="1", failures="0", skipped="0", errors="1")
    case = ET.SubElement(ts, "testcase", classname=suite, name=step)
    message = (str(err).strip().splitlines() or [type(err).__name__])[0]
    ET.SubElement(case, "error", message=message, type=type(err).__name__).text = message
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_failure_junit(out_dir: Path, suite: str, step: str, err: BaseException) -> Path:
    path = out_dir / JUNIT
    _write(path, render_failure_junit(suite, step, err))
    return path


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_reports(out_dir: Path, verification: dict[str, Any], title: str,
                  stages: list[dict[str, Any]] = ()) -> list[Path]:
    md = render_markdown(verification, title, stages)
    paths = [out_dir / REPORT_MD, out_dir / REPORT_JSON, out_dir / JUNIT]
    _write(paths[0], md)
    _write(paths[1], json.dumps(verification, indent=2) + "\n")
    _write(paths[2], render_junit(verification, title))
    append_step_summary(md)
    return paths


def append_step_summary(md: str) -> None:
    """Append Markdown to the CI job summary when GITHUB_STEP_SUMMARY names one (GitHub Actions, Forgejo)."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(md + "\n")
