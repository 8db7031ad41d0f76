"""The quantize stage's scheme x algorithm table, per runtime, from finished builds' manifests.

Build the matrix (each build runs its artifact on its own runtime through the shared harness), then collate:

    for t in $(python -c "import yaml; print(' '.join(yaml.safe_load(open('scripts/quant_matrix.yaml'))['targets']))"); do
        compress build --target $t --targets scripts/quant_matrix.yaml --out out/matrix/$t
    done
    python scripts/quant_table.py out/matrix/* > table.md

Columns: average code bits per linear weight (embedding and lm_head excluded) and stored bits (codes plus
fp32 scales and offsets), artifact size, mean KL / top-1 / PPL ratio against the fp32 reference over the
harness's evaluation windows, prefill and decode speed (the harness's latency child: medians of its repeats),
the stage's own KL on calibration windows (eager PyTorch) and the stage time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(build: Path) -> dict:
    manifest = json.loads((build / "manifest.json").read_text())
    stage = next((s for s in manifest["stages"] if s["kind"] == "quantize"), None)
    notes = stage["notes"] if stage else {}
    scheme = notes.get("scheme", {})
    metrics = (manifest.get("verification") or {}).get("metrics", {})
    seconds = notes.get("seconds", {})
    promoted = len(notes.get("promoted_to_8bit", []))
    return {
        "build": build.name, "format": manifest["artifact"]["format"],
        "algorithm": scheme.get("algorithm", "exporter's own"),
        "scheme": (f"int{scheme.get('weight_bits')} g{scheme.get('group_size')}"
                   f"{'' if scheme.get('algorithm') in ('hqq', 'keep_gguf') else (' sym' if scheme.get('symmetric') else ' asym')}"
                   f"{f', {promoted} linears 8-bit' if promoted else ''}") if scheme else "-",
        "code_bits": notes.get("avg_code_bits"), "stored_bits": notes.get("avg_stored_bits"),
        "size_mb": metrics.get("size_mb"), "kl": metrics.get("mean_kl"), "top1": metrics.get("top1_agreement"),
        "ppl": metrics.get("perplexity_ratio"), "prefill": metrics.get("prefill_tok_s"),
        "decode": metrics.get("decode_tok_s"), "stage_kl": notes.get("kl_vs_unquantized"),
        "stage_s": sum(seconds.values()) if seconds else None,
    }


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(paths: list[str]) -> None:
    rows = [row(Path(p)) for p in paths if (Path(p) / "manifest.json").is_file()]
    print("| build | format | algorithm | scheme | code bits | stored bits | size MB | mean KL | top-1 | PPL ratio "
          "| prefill tok/s | decode tok/s | stage KL (calib, eager) | stage s |")
    print("|" + "---|" * 14)
    for r in rows:
        print(f"| {r['build']} | {r['format']} | {r['algorithm']} | {r['scheme']} | {fmt(r['code_bits'], '.2f')} | "
              f"{fmt(r['stored_bits'], '.2f')} | {fmt(r['size_mb'], '.1f')} | {fmt(r['kl'], '.4f')} | "
              f"{fmt(r['top1'], '.3f')} | {fmt(r['ppl'], '.3f')} | {fmt(r['prefill'], '.0f')} | "
              f"{fmt(r['decode'], '.1f')} | {fmt(r['stage_kl'], '.4f')} | {fmt(r['stage_s'], '.0f')} |")


if __name__ == "__main__":
    main(sys.argv[1:])
