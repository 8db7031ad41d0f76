"""Data-parallel distillation: 2 CPU processes under torchrun (gloo) match one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.compress.stages import ddp_worker

REPO = Path(__file__).resolve().parents[3]


def test_two_processes_match_one(tmp_path):
    ddp_worker.run(tmp_path)  # the single-process baseline, in this process
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(ddp_worker.__file__)), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "losses-1.json").read_text())
    two = json.loads((tmp_path / "losses-2.json").read_text())
    assert len(one) == len(two) == ddp_worker.CONFIG.steps
    assert one[-1] < one[0]  # it learned something, so matching is not trivial
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (one, two)
    w1, w2 = torch.load(tmp_path / "student-1.pt"), torch.load(tmp_path / "student-2.pt")
    # Adam turns float-rounding differences in near-zero gradients into visible steps on single elements,
    # so the weights are compared tensor by tensor, relative to the tensor's norm.
    for name in w1:
        assert float((w2[name] - w1[name]).norm() / w1[name].norm()) < 1e-3, name
