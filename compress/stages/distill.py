"""Knowledge distillation from the fp32 reference (the teacher) into the current model (the student).

Loss: T² · KL(softmax(teacher/T) ‖ softmax(student/T)) per position, plus optionally a hidden-state loss
on the final (normed) hidden states, which exist at equal widths because pruning keeps the embedding.
Data: calibration windows (the split the harness never scores); when the corpus cannot fill one batch,
text the teacher samples itself. After a quantize stage the student keeps its codes and trains their per-group
scales and offsets and the norm gains (compress.stages.grid_tuning): quantization-aware distillation on exactly
the grid the exporters write, whose result is again the stage's codes. Budgets: `tokens` and/or `max_minutes`, whichever ends first.

Throughput on a 2-core CPU is the constraint, so: the teacher runs under no_grad and returns hidden
states only; both models' logits are formed chunk by chunk inside the loss under activation
checkpointing, so a (batch, seq, 49k) logits tensor never exists for either model; bf16 autocast is
optional (AMX). Checkpoints (model, optimizer, schedule, step, elapsed time) are written atomically to
the work dir every `checkpoint_every` steps; re-running the same stage resumes from the last one.

Under `torchrun` the student is wrapped in DistributedDataParallel: the global batch is split across
ranks, gradients are averaged, and every rank stops at the same step.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import os
import time
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from compress import distributed
from compress.config import to_data
from compress.errors import InputError
from compress.hashing import sha256_json
from compress.metrics import kl_per_position, mean_kl
from compress.quantized import QuantizedWeights, Rotation
from compress.stages import StageContext, StageResult, fake_quant, grid_tuning
from compress.stages.configs import DistillConfig
from compress.threads import torch_threads

CHUNK = 64  # positions per loss chunk: (batch, 64, 49152) fp32 logits are ~50 MB at batch 4


def _chunk_kl(h: torch.Tensor, w: torch.Tensor, t_h: torch.Tensor, t_w: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed KL over a chunk of positions, logits formed here so checkpointing can drop them."""
    student = h @ w.T  # (batch, chunk, vocab)
    with torch.no_grad():
        teacher = t_h @ t_w.T  # (batch, chunk, vocab)
    return kl_per_position(teacher, student, temperature).sum()


class DistillLoss(nn.Module):
    """The student's forward pass and loss as one module, so DistributedDataParallel can wrap it."""

    def __init__(self, student: Any, temperature: float, hidden_weight: float, recompute: bool = False):
        super().__init__()
        self.student, self.temperature, self.hidden_weight = student, temperature, hidden_weight
        self.recompute = recompute  # drop each chunk's logits after use and recompute them for backward

    def forward(self, ids: torch.Tensor, t_hidden: torch.Tensor, t_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.student.model(input_ids=ids, use_cache=False).last_hidden_state  # (batch, seq, hidden)
        w = self.student.lm_head.weight  # (vocab, hidden)
        chunk_kl = functools.partial(checkpoint, _chunk_kl, use_reentrant=False) if self.recompute else _chunk_kl
        kl = sum(chunk_kl(h[:, i:i + CHUNK], w, t_hidden[:, i:i + CHUNK], t_head, self.temperature)
                 for i in range(0, ids.shape[1], CHUNK)) / ids.numel()
        loss = kl * self.temperature ** 2
        if self.hidden_weight:
            # Normalised by the teacher's energy: the scale of the hidden state varies across models.
            hidden = (h.float() - t_hidden.float()).pow(2).mean() / t_hidden.float().pow(2).mean()
            loss = loss + self.hidden_weight * hidden
        return loss, kl.detach()


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at the planned last step (a factor)."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def fingerprint(model: Any) -> str:
    """A digest of the model's weights: a checkpoint resumes only the run it was written by."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _save(path: Any, state: dict) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a checkpoint is complete or absent, never half-written


def _batch(windows: list[list[int]], step: int, cfg: DistillConfig, seed: int, world: distributed.World) -> torch.Tensor:
    """This rank's share of the global batch for `step`: a fresh seeded permutation every epoch."""
    n, per_rank = len(windows), cfg.batch_size // world.size
    rows = []
    for pos in range(step * cfg.batch_size + world.rank * per_rank, step * cfg.batch_size + (world.rank + 1) * per_rank):
        epoch, idx = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        rows.append(windows[int(perm[idx])])
    return torch.tensor(rows)  # (batch / ranks, seq)


def train(student: Any, teacher: Any, windows: list[list[int]], cfg: DistillConfig, checkpoint_path: Any,
          console: Any, seed: int = 0) -> dict:
    """Distill in place into `student`; returns notes. Resumes from `checkpoint_path` when it exists."""
    world = distributed.current_world()
    device = distributed.device_for(world)
    params = [p for p in student.parameters() if p.requires_grad]
    loss_module = DistillLoss(student, cfg.temperature, cfg.hidden_loss_weight)
    model = loss_module
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(loss_module, device_ids=[device] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg))
    step, elapsed, losses, resumed_from = 0, 0.0, [], None
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=True)
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, elapsed, losses, resumed_from = state["step"], state["elapsed"], list(state["losses"]), state["step"]
        console.print(f"  resuming distillation at step {step}/{cfg.steps} from {checkpoint_path.name}")
    t_head = teacher.lm_head.weight.detach()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast)
    student.train()
    start, stopped_by = time.perf_counter() - elapsed, "tokens"
    window_tokens, run_start, run_step0 = cfg.batch_size * cfg.seq_len, time.perf_counter(), step
    with console.meter("distilling", cfg.steps, step) as update:
        while step < cfg.steps:
            over_time = cfg.max_minutes is not None and time.perf_counter() - start > cfg.max_minutes * 60
            if distributed.any_rank(over_time, world):
                stopped_by = "time"
                break
            ids = _batch(windows, step, cfg, seed, world).to(device)
            with torch.no_grad(), autocast:
                t_hidden = teacher.model(input_ids=ids, use_cache=False).last_hidden_state  # (b, seq, hidden)
            with autocast:
                loss, kl = model(ids, t_hidden, t_head)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(distributed.all_mean(float(loss.detach()), world))
            if world.main and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                _save(checkpoint_path, {"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                                        "schedule": schedule.state_dict(), "step": step,
                                        "elapsed": time.perf_counter() - start, "losses": losses})
            rate = (step - run_step0) * window_tokens / (time.perf_counter() - run_start)
            update(step, f"loss {losses[-1]:.4f}  {rate:.0f} tok/s")
    student.eval()
    seconds = time.perf_counter() - run_start
    return {"steps": step, "planned_steps": cfg.steps, "stopped_by": stopped_by, "tokens": step * window_tokens,
            "resumed_from_step": resumed_from, "ranks": world.size,
            "tokens_per_s": round((step - run_step0) * window_tokens / seconds, 1) if step > run_step0 else None,
            "train_seconds": round(time.perf_counter() - start, 1),
            "loss_first": round(losses[0], 5) if losses else None, "loss_last": round(losses[-1], 5) if losses else None,
            "losses": [round(x, 6) for x in losses]}


def generate_windows(teacher: Any, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` windows of `length` tokens sampled from the teacher, starting from BOS (fallback data)."""
    start = teacher.config.bos_token_id if teacher.config.bos_token_id is not None else 0
    out: list[list[int]] = []
    with torch.random.fork_rng(), torch.inference_mode():  # seeded without touching the global generator
        torch.manual_seed(seed)
        while len(out) < count:
            n = min(8, count - len(out))
            ids = torch.full((n, 1), start, dtype=torch.long)  # (n, 1)
            gen = teacher.generate(ids, do_sample=True, top_k=0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                                   attention_mask=torch.ones_like(ids), pad_token_id=start)
            out.extend(gen[:, :length].tolist())
    return out


def training_windows(ctx: StageContext, cfg: DistillConfig) -> tuple[list[list[int]], str]:
    """(windows, where they came from): held-out KL windows first, then one per budgeted sequence."""
    count = cfg.kl_windows + cfg.steps * cfg.batch_size
    try:
        return ctx.calibration(count, cfg.seq_len), "calibration"
    except InputError as err:
        if not cfg.generated_windows:
            raise InputError(f"{err}; or set distill.generated_windows to train on teacher-generated text") from None
    with ctx.console.step(f"Corpus too small: sampling {cfg.generated_windows + cfg.kl_windows} windows from the "
                          f"teacher"):
        return generate_windows(ctx.reference, cfg.kl_windows + cfg.generated_windows, cfg.seq_len, ctx.seed), \
            "teacher-generated"


@torch.inference_mode()
def held_out_kl(reference: Any, model: Any, windows: list[list[int]]) -> float:
    ids = torch.tensor(windows)  # (windows, seq)
    return mean_kl(reference(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits)


def check(model: Any, cfg: DistillConfig, reference: Any, world: distributed.World,
          quantized: QuantizedWeights | None = None) -> None:
    """Everything that can be refused before work starts."""
    if cfg.batch_size % world.size:
        raise InputError(f"distill.batch_size: {cfg.batch_size} does not split across {world.size} data-parallel "
                         f"ranks; use a multiple of {world.size}")
    if cfg.hidden_loss_weight and model.config.hidden_size != reference.config.hidden_size:
        raise InputError(f"distill.hidden_loss_weight: the student's hidden size {model.config.hidden_size} differs "
                         f"from the teacher's {reference.config.hidden_size}; set it to 0")
    if cfg.hidden_loss_weight and quantized is not None and quantized.config.rotation is not Rotation.NONE:
        raise InputError("distill.hidden_loss_weight: the quantize stage rotated the student's hidden states, so they "
                         "are not comparable with the teacher's; set it to 0")
    if cfg.fake_quant and not fake_quant.quantizable_linears(model, cfg.fake_quant.group_size):
        raise InputError(f"distill.fake_quant.group_size: {cfg.fake_quant.group_size} divides no linear layer's "
                         f"input width")


class DistillStage:
    version = "3"  # 2: after a quantize stage, trains its grids (compress.stages.grid_tuning); 3: onto fp16 values

    def run(self, model: Any, config: DistillConfig, ctx: StageContext) -> StageResult:
        world = distributed.current_world()
        check(model, config, ctx.reference, world, ctx.quantized)
        with torch_threads(config.threads or torch.get_num_threads()):
            windows, source = training_windows(ctx, config)
            held_out, train_windows = windows[:config.kl_windows], windows[config.kl_windows:]
            student = copy.deepcopy(model).float()  # the input model stays untouched
            if config.fake_quant:
                fake_quant.attach(student, config.fake_quant)
            grids = grid_tuning.attach(student, ctx.quantized) if ctx.quantized is not None else []
            kl_before = held_out_kl(ctx.reference, student, held_out) if held_out else None
            if config.skip_below_kl is not None and kl_before is not None and kl_before <= config.skip_below_kl:
                ctx.console.print(f"  held-out KL {kl_before:.4g} <= skip_below_kl {config.skip_below_kl}: not "
                                  f"training")
                return StageResult(model, {"skipped": True, "kl_before": kl_before, "kl_after": kl_before},
                                   ctx.quantized)
            key = sha256_json([to_data(config), ctx.seed, world.size, fingerprint(model), len(train_windows)])
            ctx.work_dir.mkdir(parents=True, exist_ok=True)
            path = ctx.work_dir / f"distill-{key[:16]}.pt"
            device = distributed.device_for(world)
            teacher = ctx.reference if device.type == "cpu" else copy.deepcopy(ctx.reference).to(device)
            notes = train(student.to(device), teacher.eval(), train_windows, config, path, ctx.console, ctx.seed)
            student = student.cpu()
            kl_after = held_out_kl(ctx.reference, student, held_out) if held_out else None
            if config.fake_quant:
                fake_quant.detach(student)
            quantized = grid_tuning.detach(student, ctx.quantized, grids) if ctx.quantized is not None else None
        if world.main:
            path.unlink(missing_ok=True)  # finished: the stage cache holds the result now
        what = f"{len(held_out)} held-out calibration windows x {config.seq_len} tokens" + (
            f", with {config.fake_quant.weight_bits}-bit fake quantization" if config.fake_quant else "") + (
            f", on the quantize stage's grids ({len(grids)} linears: codes fixed, scales and offsets trained)"
            if grids else "")
        notes.update({"data": source, "distinct_windows": len(train_windows), "kl_before": kl_before,
                      "kl_after": kl_after, "kl_measured_on": what})
        if kl_before is not None:
            ctx.console.print(f"  distilled: KL {kl_before:.4f} -> {kl_after:.4f} ({what}); "
                              f"{notes['tokens_per_s']} tok/s")
        if quantized is not None:
            notes.update(grids_trained=len(grids), **quantized.bits_summary())
            if kl_before is not None and kl_after >= kl_before:  # recovery never hands on a worse model
                ctx.console.print("  [yellow]training did not lower the held-out KL: the quantize stage's grids are "
                                  "kept[/yellow]")
                notes["kept"] = "input"
                return StageResult(model, notes, ctx.quantized)
        return StageResult(student, notes, quantized)
