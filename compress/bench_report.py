"""`compress bench`'s outputs: one table (bench.md, bench.json, bench.csv), written atomically, and two plots.

Speeds are also stated as ratios to llama.cpp Q4_0 measured in the same run, because absolute numbers on a
shared machine drift between runs. The plots mark the Pareto front: the entries no other entry beats on both
axes (smaller and lower KL; faster and lower KL).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compress.bench import BASELINE, Entry, depth_key
from compress.report import append_step_summary

# (key, header, format) in table order; keys index a row dict.
COLUMNS = (
    ("name", "artifact", "{}"), ("detail", "weights", "{}"), ("format", "format", "{}"),
    ("runtime", "runtime", "{}"), ("size_mb", "size MB", "{:.1f}"), ("load_s", "load s", "{:.2f}"),
    ("prefill_tok_s", "prefill tok/s", "{:.0f}"), ("ttft_ms", "TTFT ms", "{:.0f}"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"), ("decode_spread", "decode spread", "{:.0%}"),
    ("itl_p50_ms", "ITL p50 ms", "{:.1f}"), ("itl_p95_ms", "ITL p95 ms", "{:.1f}"),
    ("implied_gbs", "weights GB/s", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("mean_kl", "mean KL", "{:.4f}"), ("top1_agreement", "top-1", "{:.3f}"),
    ("perplexity_ratio", "PPL ratio", "{:.3f}"), ("prefill_vs_q4_0", "prefill ÷ Q4_0", "{:.2f}×"),
    ("decode_vs_q4_0", "decode ÷ Q4_0", "{:.2f}×"),
)
# Latency columns taken from the medians of the rounds (compress.bench.Entry.latency); TTFT is shown in ms.
LATENCY_COLUMNS = ("load_s", "prefill_tok_s", "decode_tok_s", "decode_spread", "itl_p50_ms", "itl_p95_ms",
                   "peak_rss_mb")
FILES = ("bench.md", "bench.json", "bench.csv")
PLOTS = {"size": "bench_size_vs_kl.png", "decode": "bench_decode_vs_kl.png"}


def rows(entries: Sequence[Entry], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """One flat dict per entry: accuracy, medians of latency rounds, and speed ratios to the baseline peer."""
    out = []
    for e in entries:
        lat = e.latency()
        out.append({"name": e.name, "kind": e.kind, "peer": e.peer, "detail": e.detail, "format": e.format, "runtime": e.runtime,
                    "size_mb": e.metrics.get("size_mb"), **{k: lat.get(k) for k in LATENCY_COLUMNS},
                    "ttft_ms": 1000 * lat["ttft_s"] if "ttft_s" in lat else None,
                    **{k: v for k, v in lat.items() if k.startswith(depth_key(""))},
                    "depths_not_measured": e.depth_notes(),
                    "mean_kl": e.metrics.get("mean_kl"), "p99_kl": e.metrics.get("p99_kl"),
                    "top1_agreement": e.metrics.get("top1_agreement"),
                    "perplexity_ratio": e.metrics.get("perplexity_ratio"),
                    "greedy_match_mean": e.metrics.get("greedy_match_mean"),
                    "latency_rounds": e.rounds, "note": e.latency_note, "error": e.error,
                    "runtime_settings": e.runtime_settings,
                    # a peer's deviations from its tool's documented settings, and why (its exporter's record)
                    "deviations": dict(e.artifact.record.get("deviations", {})) if e.artifact else {}})
    for r in out:  # every weight read once per decoded token: size on disk x decode speed
        ok = r["size_mb"] is not None and r["decode_tok_s"] is not None
        r["implied_gbs"] = r["size_mb"] * r["decode_tok_s"] / 1000 if ok else None
    base = next((r for r in out if r["peer"] == baseline), None)
    for r in out:
        for key, ratio in (("prefill_tok_s", "prefill_vs_q4_0"), ("decode_tok_s", "decode_vs_q4_0")):
            ok = base is not None and base[key] and r[key] is not None
            r[ratio] = r[key] / base[key] if ok else None
    return out


def pareto_front(points: Sequence[tuple[str, float, float]]) -> set[str]:
    """Names of the points no other point dominates, both coordinates minimized (negate one to maximize it).

    A point is dominated when another is at least as good on both and strictly better on one."""
    front = set()
    for name, x, y in points:
        if not any((qx <= x and qy <= y) and (qx < x or qy < y) for _, qx, qy in points):
            front.add(name)
    return front


def columns(protocol: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    """COLUMNS with one decode-speed column per `--depths` depth after the decode columns."""
    at = next(i for i, (k, _, _) in enumerate(COLUMNS) if k == "itl_p95_ms") + 1
    depth = tuple((depth_key(d), f"decode tok/s @{d}", "{:.1f}") for d in protocol.get("depths", ()))
    return COLUMNS[:at] + depth + COLUMNS[at:]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or value == "":
        depth = key.removeprefix(depth_key("")) if key.startswith(depth_key("")) else None
        if key in (*LATENCY_COLUMNS, "ttft_ms", "implied_gbs") and row["note"] or depth is not None and (
                row["note"] or depth in row.get("depths_not_measured", {})):
            return "not measured"
        return "—"
    return fmt.format(value)


def render_markdown(table: list[dict[str, Any]], protocol: dict[str, Any]) -> str:
    on = protocol["measured_on"]
    ev = protocol["eval_set"]
    lines = [
        f"## compress bench: {protocol['model']}",
        "",
        (f"Measured on {on['cpu']} ({on['logical_cores']} logical cores, {on['os']}), {protocol['threads']} threads, "
        f"{protocol['date']}. Accuracy: {ev['windows']} windows × {ev['window_len']} tokens and {ev['prompts']} "
        f"greedy prompts, KL against the fp32 reference. Latency: {protocol['prefill_tokens']}-token prompt, "
        f"{protocol['decode_tokens']} greedy tokens, {protocol['warmup']} warm-up + {protocol['repeats']} repeats "
        f"per child process, median of {protocol['rounds']} alternating rounds. TTFT: the prompt's prefill to "
        f"the first token. ITL: inter-token latency of each decode step, p50/p95 over the repeats. Decode spread: "
        f"(max - min) / median of the rounds' decode tok/s. Weights GB/s: size on disk x decode tok/s, the "
        f"bandwidth decoding implies if each token reads every weight once"
        + (f" (this machine's copy bandwidth at --threads {protocol['threads']}: "
           f"{protocol['copy_bandwidth_gbs']:.1f} GB/s)" if protocol.get("copy_bandwidth_gbs") else "")
        + ". Ratios: to llama.cpp Q4_0 from the same run."
        + (f" Decode @N: {protocol['decode_tokens']} greedy tokens after N tokens are in the cache (the prompt "
           f"repeated), median of the repeats." if protocol.get("depths") else "")),
        "",
        "| " + " | ".join(h for _, h, _ in columns(protocol)) + " |",
        "|" + "---|" * len(columns(protocol)),
    ]
    for r in table:
        cells = [_cell(r, k, f) for k, _, f in columns(protocol)]
        if r["error"]:
            cells[0] += " ⚠"
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['name']}: {r['note']}" for r in table if r["note"]]
    notes += [f"- {r['name']}: {key} = {s['value']} ({s['why']})" for r in table
              for key, s in r.get("runtime_settings", {}).items()]
    notes += [f"- {r['name']}: {key}: {why}" for r in table for key, why in r.get("deviations", {}).items()]
    notes += [f"- {r['name']}: decode @{d} not measured: {why}" for r in table
              for d, why in r.get("depths_not_measured", {}).items()]
    notes += [f"- ⚠ {r['name']}: FAILED: {r['error']}" for r in table if r["error"]]
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def render_csv(table: list[dict[str, Any]], protocol: dict[str, Any]) -> str:
    keys = [k for k, _, _ in columns(protocol)] + ["kind", "p99_kl", "greedy_match_mean", "note", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in table:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in keys})
    return buf.getvalue()


def _write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_outputs(out_dir: Path, table: list[dict[str, Any]], protocol: dict[str, Any]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = render_markdown(table, protocol)
    _write_atomic(out_dir / "bench.md", md)
    _write_atomic(out_dir / "bench.json", json.dumps({"protocol": protocol, "rows": table}, indent=2, default=float))
    _write_atomic(out_dir / "bench.csv", render_csv(table, protocol))
    append_step_summary(md)
    return {name: out_dir / name for name in FILES}


def plot_points(table: list[dict[str, Any]], axis: str) -> list[tuple[str, float, float]]:
    """(name, x, y) with both coordinates to minimize: (size or -decode, mean KL)."""
    key = "size_mb" if axis == "size" else "decode_tok_s"
    sign = 1 if axis == "size" else -1
    return [(r["name"], sign * r[key], r["mean_kl"]) for r in table
            if r.get(key) is not None and r.get("mean_kl") is not None]


def write_plots(out_dir: Path, table: list[dict[str, Any]], protocol: dict[str, Any]) -> list[Path]:
    """Two PNGs, one labelled point per artifact, the Pareto front joined and marked. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis, filename in PLOTS.items():
        points = plot_points(table, axis)
        if not points:
            continue
        front = pareto_front(points)
        sign = 1 if axis == "size" else -1
        fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
        ax.set_yscale("symlog", linthresh=1e-3)
        if axis == "size":
            ax.set_xscale("log")
        for name, x, kl in points:
            on = name in front
            kind = next(r["kind"] for r in table if r["name"] == name)
            ax.scatter(sign * x, kl, s=60 if on else 35, marker="o" if kind == "build" else "s",
                       color="tab:red" if on else "tab:gray", zorder=3)
        _label(ax, [(name.replace(" (peer)", ""), sign * x, kl) for name, x, kl in points])
        line = sorted((sign * x, kl) for name, x, kl in points if name in front)
        ax.plot([p[0] for p in line], [p[1] for p in line], color="tab:red", lw=1, ls="--", zorder=2,
                label="Pareto front")
        ax.set_ylabel("mean KL vs fp32 (nats, symlog)")
        ax.set_xlabel("size (MB)" if axis == "size" else f"decode tok/s ({protocol['threads']} threads)")
        missing = [r["name"] for r in table if (r.get("size_mb" if axis == "size" else "decode_tok_s") is None)]
        title = f"{protocol['model']}: {'size' if axis == 'size' else 'decode speed'} vs KL"
        ax.set_title(title + (f"\n(not shown: {', '.join(missing)})" if missing else ""), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.scatter([], [], marker="o", color="tab:gray", label="build")  # legend entries for the two shapes
        ax.scatter([], [], marker="s", color="tab:gray", label="peer")
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        _write_atomic(out_dir / filename, buf.getvalue())
        written.append(out_dir / filename)
    return written


def _label(ax: Any, points: list[tuple[str, float, float]]) -> None:
    """Label each point; a label that would sit on an earlier one moves down a line (equal points happen:
    the desktop-gguf build and the llama.cpp q8_0 peer are the same file)."""
    ax.figure.canvas.draw()  # fixes the axis limits, so data -> pixel positions are final
    placed: list[tuple[float, float]] = []
    for name, x, y in sorted(points, key=lambda p: (-p[2], p[1])):
        px, py = ax.transData.transform((x, y))
        dy = 4.0
        while any(abs(px - qx) < 70 and abs(py + dy - qy) < 10 for qx, qy in placed):
            dy -= 10
        placed.append((px, py + dy))
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, dy * 72 / ax.figure.dpi), fontsize=8)
