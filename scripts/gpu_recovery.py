"""Distillation budgets measured on a GPU: how many tokens recovery takes, and what 1B-scale training costs.

The project never needs a GPU (every stage runs on CPU; the distill stage uses CUDA when it is there). This script
answers what a CI-sized CPU budget cannot: it runs the stages' own code (compress.stages) on a CUDA machine and
scores every result in eager PyTorch on the harness's evaluation windows (mean KL against the fp32 model):

  qat    android's quantize stage (from targets.yaml) on the off-grid model, then a distill on the stage's own grid
         (compress.stages.grid_tuning: codes fixed, scales/offsets and norm gains trained) at several token budgets;
  small  android-small's prune, a full distill at several token budgets, android's quantize stage on the best
         student, and a distill on its grid;
  gen    the largest budgets again on text the teacher samples itself instead of the calibration split;
  1b     a random-weight Llama 3.2 1B (its exact shape): distill throughput and peak GPU memory, full and grid.

    python scripts/gpu_recovery.py prepare data.json            # on the build machine: windows, tokenized once
    python scripts/gpu_recovery.py run data.json --out r.json   # on the GPU machine (COMPRESS_HOME holding the model)

`prepare` stores the calibration token stream and the evaluation windows, so the GPU machine, whose Python ships
other pydoc text, scores the same windows as `compress build`. Results are written after every experiment.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from compress.data.corpus import (
    Split,
    build_eval_set,
    calibration_windows,
    load_documents,
    token_stream,
    windows_from,
)
from compress.metrics import mean_kl
from compress.models import load_spec
from compress.progress import Console
from compress.stages import StageContext, grid_tuning
from compress.stages import distill as distill_stage
from compress.stages.configs import DistillConfig, PruneConfig
from compress.stages.distill import train
from compress.targets import EvalSpec, StageKind, load_targets

SEQ = 256


def prepare(args: argparse.Namespace) -> None:
    loaded = load_spec(args.model, Console(quiet=True))
    tok = loaded.tokenizer
    stream = token_stream(load_documents("pydoc"), Split.CALIBRATION, tok)
    assert calibration_windows(tok, "pydoc", 4, SEQ) == windows_from(stream, 4, SEQ, "")
    windows = [list(w) for w in build_eval_set(tok, EvalSpec(), None).windows]
    with torch.inference_mode():
        check = float(loaded.model(torch.tensor(windows[:1])).logits[0, :16].double().sum())
    Path(args.data).write_text(json.dumps({"model": args.model, "calibration": stream, "eval": windows,
                                           "logit_check": check}))
    print(f"{args.data}: {len(stream)} calibration tokens, {len(windows)} evaluation windows")


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args, self.start, self.results = args, time.perf_counter(), {"experiments": []}
        self.rates: dict[str, float] = {}
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.console = Console()
        self.work = Path(tempfile.mkdtemp(prefix="gpu-recovery-"))

    def left(self) -> float:
        return self.args.max_seconds - (time.perf_counter() - self.start)

    def fits(self, tokens: int, kind: str) -> bool:
        """Whether a run of `tokens` should end inside the time left, at the rate last measured for `kind`."""
        rate = self.rates.get(kind)
        ok = self.left() > 30 and (rate is None or tokens / rate < self.left() - 30)
        if not ok:
            print(f"SKIPPED {kind} {tokens} tokens: {self.left():.0f} s left", flush=True)
        return ok

    def record(self, **row: Any) -> None:
        row["at_s"] = round(time.perf_counter() - self.start, 1)
        self.results["experiments"].append(row)
        print("RESULT " + json.dumps(row), flush=True)
        Path(self.args.out).write_text(json.dumps(self.results, indent=1))

    def distill(self, student: Any, teacher: Any, windows: list[list[int]], tokens: int, lr: float,
                label: str) -> dict:
        batch = max(4, min(32, tokens // (SEQ * 64)))  # >= 64 steps; CI-sized budgets keep the build's batch of 4
        cfg = DistillConfig(tokens=tokens, batch_size=batch, seq_len=SEQ, learning_rate=lr,
                            warmup_steps=max(4, tokens // (batch * SEQ) // 20), kl_windows=0, autocast=True,
                            checkpoint_every=10 ** 6)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        path = self.work / f"{label.replace(' ', '-')}.pt"
        notes = train(student, teacher, windows, cfg, path, Console(quiet=True))
        path.unlink(missing_ok=True)
        self.rates[label.split()[-1]] = notes["tokens_per_s"] or 1.0
        peak = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if self.cuda else None
        return {"tokens": notes["tokens"], "batch": batch, "lr": lr, "tok_s": notes["tokens_per_s"],
                "train_s": notes["train_seconds"], "peak_gib": peak,
                "loss_last": notes["loss_last"]}


def run(args: argparse.Namespace) -> None:
    distill_stage._save = lambda path, state: None  # no resumable checkpoints here: a 1B one is ~15 GB of writes
    r = Run(args)
    r.results["gpu"] = torch.cuda.get_device_name(0) if r.cuda else "none (smoke run)"
    r.results["torch"] = torch.__version__
    if "1b" in args.only:
        one_b(r, ONE_B if args.shape == "1b" else TINY)
    if not {"qat", "small", "gen"} & set(args.only):
        return
    data = json.loads(Path(args.data).read_text())
    data["model"] = args.model or data["model"]
    with r.console.step(f"Loading {data['model']}"):
        teacher_cpu = load_spec(data["model"], Console(quiet=True)).model.eval()
    eval_ids = torch.tensor(data["eval"])
    with torch.inference_mode():
        check = float(teacher_cpu(eval_ids[:1]).logits[0, :16].double().sum())
    r.results["logit_check"] = {"here": check, "prepared": data["logit_check"]}
    teacher = copy.deepcopy(teacher_cpu).to(r.dev)
    eval_gpu = eval_ids.to(r.dev)
    with torch.inference_mode():
        ref = teacher(eval_gpu).logits.float()

    def kl(model: Any) -> float:
        model.eval()
        with torch.inference_mode():
            return round(mean_kl(ref, model(eval_gpu).logits.float()), 5)

    def calibration(count: int, length: int) -> list[list[int]]:
        return windows_from(data["calibration"], count, length, "calibration split")

    def ctx(reference: Any) -> StageContext:
        return StageContext(0, r.work, calibration, reference, r.console)

    targets = load_targets()
    quantize_cfg = next(s.config for s in targets.get("android").stages if s.kind is StageKind.QUANTIZE)
    prune_cfg: PruneConfig = next(s.config for s in targets.get("android-small").stages if s.kind is StageKind.PRUNE)
    r.record(name="teacher", kl_gpu_vs_gpu=kl(teacher))

    def quantize(model: Any, label: str) -> Any:
        from compress.stages.quantize import QuantizeStage

        t0 = time.perf_counter()
        out = QuantizeStage().run(model, quantize_cfg, ctx(teacher))
        r.record(name=f"{label}: quantize stage (android's config)", kl=kl(out.model),
                 seconds=round(time.perf_counter() - t0, 1), avg_code_bits=out.notes.get("avg_code_bits"),
                 smoothing_kept=(out.notes.get("smoothing") or {}).get("kept"),
                 promoted=len(out.notes.get("promoted_to_8bit", [])))
        return out

    def grid_distill(stage: Any, tokens: int, windows: list[list[int]], label: str) -> None:
        student = copy.deepcopy(stage.model).float()
        grids = grid_tuning.attach(student, stage.quantized)
        info = r.distill(student, teacher, windows, tokens, 1e-3, f"{label} grid")
        r.record(name=f"{label}: grid distill", kl=kl(student), linears=len(grids), **info)

    budgets = [int(b) for b in args.budgets.split(",")]
    if "qat" in args.only:
        stage = quantize(teacher, "off-grid")
        for tokens in budgets:
            if not r.fits(tokens, "grid"):
                break
            grid_distill(stage, tokens, calibration(tokens // SEQ, SEQ), f"off-grid {tokens}")
    pruned = None
    if "small" in args.only and r.left() > 120:
        from compress.stages.prune import PruneStage

        t0 = time.perf_counter()
        pruned = PruneStage().run(teacher_cpu, prune_cfg, ctx(teacher_cpu)).model.to(r.dev)
        r.record(name="small: prune (CPU)", kl=kl(pruned), seconds=round(time.perf_counter() - t0, 1))
        best = None
        for tokens in [int(b) for b in args.small_budgets.split(",")]:
            if not r.fits(tokens, "full"):
                break
            student = copy.deepcopy(pruned).float()
            info = r.distill(student, teacher, calibration(tokens // SEQ, SEQ), tokens, 3e-4, f"small {tokens} full")
            r.record(name=f"small {tokens}: distill", kl=kl(student), **info)
            best = student
        if best is not None and r.left() > 120:
            stage_small = quantize(best, "small")
            if r.fits(budgets[1], "grid"):
                grid_distill(stage_small, budgets[1], calibration(budgets[1] // SEQ, SEQ), f"small {budgets[1]}")
    if "gen" in args.only and r.left() > 120:
        t0 = time.perf_counter()
        generated = sample(teacher, args.generate // SEQ)
        r.record(name="teacher-generated text", windows=len(generated), seconds=round(time.perf_counter() - t0, 1))
        if "qat" in args.only and r.fits(budgets[-1], "grid"):
            grid_distill(stage, budgets[-1], generated, f"off-grid {budgets[-1]} generated")
        tokens = int(args.small_budgets.split(",")[-1])
        if pruned is not None and r.fits(tokens, "full"):
            student = copy.deepcopy(pruned).float()
            info = r.distill(student, teacher, generated, tokens, 3e-4, "small generated full")
            r.record(name=f"small {tokens} generated: distill", kl=kl(student), **info)

def sample(teacher: Any, count: int) -> list[list[int]]:
    """`count` windows of SEQ tokens sampled from the teacher (temperature 1), from BOS, in large batches."""
    bos = teacher.config.bos_token_id or 0
    out: list[list[int]] = []
    torch.manual_seed(0)
    with torch.inference_mode(), torch.autocast(teacher.device.type, dtype=torch.bfloat16):
        while len(out) < count:
            n = min(512, count - len(out))
            ids = torch.full((n, 1), bos, dtype=torch.long, device=teacher.device)
            gen = teacher.generate(ids, do_sample=True, top_k=0, max_new_tokens=SEQ - 1, min_new_tokens=SEQ - 1,
                                   attention_mask=torch.ones_like(ids), pad_token_id=bos)
            out.extend(gen[:, :SEQ].tolist())
    return out


ONE_B = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
         "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0,
         "max_position_embeddings": 131072, "head_dim": 64,
         "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}}
TINY = {**ONE_B, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 512, "head_dim": 16}


def one_b(r: Run, shape: dict) -> None:
    """Llama 3.2 1B's shape with random weights: what a distill step costs at that size (quality means nothing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.quantized import Precision, QuantAlgorithm, QuantizeConfig
    from compress.stages.quant_plan import quantize_model

    cfg = LlamaConfig(**shape)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(r.dev):
        teacher = LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in teacher.parameters())
    r.record(name="1b: random init on GPU", params=params, seconds=round(time.perf_counter() - t0, 1))
    windows = [torch.randint(0, cfg.vocab_size, (SEQ,)).tolist() for _ in range(512)]
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    info = r.distill(student, teacher, windows, r.args.one_b_tokens, 3e-4, "1b full")
    r.record(name="1b: full distill, bf16 autocast, AdamW", **info)
    del student
    t0 = time.perf_counter()
    q = QuantizeConfig(algorithm=QuantAlgorithm.RTN, weight_bits=4, group_size=32, embedding=Precision.INT8,
                       lm_head=Precision.INT8)
    quantized, qw = quantize_model(teacher, q)
    r.record(name="1b: rtn quantize on GPU", seconds=round(time.perf_counter() - t0, 1))
    grids = grid_tuning.attach(quantized, qw)
    info = r.distill(quantized, teacher, windows, r.args.one_b_tokens, 1e-3, "1b grid")
    r.record(name="1b: grid distill (codes fixed)", linears=len(grids), **info)
    del quantized, teacher, qw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("data")
    p.add_argument("--model", default="smollm2-135m-offgrid")
    p = sub.add_parser("run")
    p.add_argument("data")
    p.add_argument("--out", default="gpu_recovery.json")
    p.add_argument("--budgets", default="65536,1048576,4194304", help="token budgets; the first is the CI one")
    p.add_argument("--small-budgets", default="204800,1048576,4194304",
                   help="android-small's distill budgets; the first is its build's")
    p.add_argument("--generate", type=int, default=1048576, help="tokens of teacher-sampled text for `gen`")
    p.add_argument("--only", default="1b,qat,gen,small")
    p.add_argument("--max-seconds", type=float, default=360)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (tiny budgets) off a GPU")
    p.add_argument("--model", default=None, help="the model to load instead of the one `prepare` tokenized for")
    p.add_argument("--one-b-tokens", type=int, default=32 * SEQ * 64, help="tokens per `1b` distill")
    p.add_argument("--shape", default="1b", choices=["1b", "tiny"], help="the `1b` experiment's model shape")
    args = parser.parse_args()
    args.only = args.only.split(",") if hasattr(args, "only") else []
    prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    main()
