"""What each model size costs per target: wall time and peak RSS of the build, seconds per stage and for the export,
artifact size, the harness's prefill/decode tok/s and accuracy against the model's own fp32 reference.

    python scripts/cost_curve.py --models smollm2-135m,smollm2-360m-shape,llama-3.2-1b-shape \\
        --targets android,web,ios,desktop-gguf --out out/cost > docs/measurements/cost_curve.md

Each build is `compress build --target T --model M --out OUT/M/T` in its own process under `/usr/bin/time -v`
(peak RSS of the whole process tree's largest member, as the kernel counts it), one at a time. A build the memory
check refuses keeps its row with the estimate that refused it. Results also go to OUT/cost_curve.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path


def run_build(model: str, target: str, out: Path, extra: list[str]) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "compress.cli", "build", "--target", target, "--model", model,
           "--out", str(out), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    row: dict = {"model": model, "target": target, "exit": proc.returncode, "wall_s": round(wall, 1),
                 "peak_rss_gb": round(int(rss.group(1)) / 1e6, 2) if rss else None}
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    if errors:
        row["error"] = errors[-1].removeprefix("error: ")
    manifest_file = out / "manifest.json"
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        row["stages_s"] = {s["kind"]: round(s["seconds"], 1) for s in manifest["stages"]}
        row["export_s"] = round(manifest["export"]["seconds"], 1)
        row["size_mb"] = round(manifest["artifact"]["total_bytes"] / 1e6, 1)
        verification = manifest.get("verification") or {}
        metrics, latency = verification.get("metrics", {}), verification.get("latency", {})
        row.update({k: metrics.get(k) for k in ("mean_kl", "top1_agreement", "perplexity_ratio")})
        row.update({k: latency.get(k) for k in ("prefill_tok_s", "decode_tok_s")})
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| model | target | exit | wall s | peak RSS GB | stages s | export s | size MB | prefill tok/s | "
            "decode tok/s | mean KL | top-1 |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        stages = ", ".join(f"{k} {v}" for k, v in (r.get("stages_s") or {}).items()) or "-"

        def f(key: str, fmt: str = "{:.3g}") -> str:
            return fmt.format(r[key]) if r.get(key) is not None else "-"

        lines.append(f"| {r['model']} | {r['target']} | {r['exit']} | {r['wall_s']} | {f('peak_rss_gb', '{}')} | "
                     f"{stages} | {f('export_s', '{}')} | {f('size_mb', '{}')} | {f('prefill_tok_s', '{:.0f}')} | "
                     f"{f('decode_tok_s', '{:.1f}')} | {f('mean_kl')} | {f('top1_agreement', '{:.3f}')} |")
        if r.get("error"):
            lines.append(f"| | | | | | {r['error']} | | | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="comma-separated model specs")
    parser.add_argument("--targets", required=True, help="comma-separated target names")
    parser.add_argument("--out", type=Path, default=Path("out/cost"))
    parser.add_argument("--no-verify", action="store_true", help="export only (no accuracy or speed columns)")
    args = parser.parse_args()
    extra = ["--no-verify"] if args.no_verify else []
    rows = []
    for model in args.models.split(","):
        for target in args.targets.split(","):
            rows.append(run_build(model, target, args.out / model / target, extra))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    (args.out / "cost_curve.json").write_text(json.dumps(rows, indent=1))
    print(markdown(rows))


if __name__ == "__main__":
    main()
