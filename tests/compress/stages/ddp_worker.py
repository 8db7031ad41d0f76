"""Run by `torchrun` in test_distill_ddp.py (and in-process for the single-process baseline).

    torchrun --standalone --nproc_per_node 2 tests/compress/stages/ddp_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from compress import distributed
from compress.models.tiny import tiny_llama
from compress.progress import Console
from compress.stages.configs import DistillConfig
from compress.stages.distill import train

CONFIG = DistillConfig(tokens=6 * 4 * 32, batch_size=4, seq_len=32, learning_rate=3e-3, warmup_steps=1,
                       checkpoint_every=100, hidden_loss_weight=0.1)


def run(out_dir: Path) -> None:
    world = distributed.init_from_env()
    teacher = tiny_llama(0)
    student = tiny_llama(1)
    rng = random.Random(0)
    windows = [[rng.randrange(256) for _ in range(CONFIG.seq_len)] for _ in range(16)]
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = train(student, teacher, windows, CONFIG, out_dir / f"ckpt-{world.size}.pt", Console(quiet=True), seed=0)
    if world.main:
        (out_dir / f"losses-{world.size}.json").write_text(json.dumps(notes["losses"]))
        torch.save(student.state_dict(), out_dir / f"student-{world.size}.pt")
    if world.size > 1:  # both ranks done before either tears gloo down (a rank once aborted in teardown)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run(Path(sys.argv[1]))
