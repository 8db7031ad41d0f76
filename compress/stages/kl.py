"""KL divergence between logits, chunked over positions so a 49k vocabulary never needs two full copies."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def kl_per_position(ref_logits: torch.Tensor, cand_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(ref/T) || softmax(cand/T)) at each position: (..., vocab) -> (...)."""
    ref = F.log_softmax(ref_logits.float() / temperature, dim=-1)
    cand = F.log_softmax(cand_logits.float() / temperature, dim=-1)
    return (ref.exp() * (ref - cand)).sum(-1)


@torch.no_grad()
def mean_kl(ref_logits: torch.Tensor, cand_logits: torch.Tensor, chunk: int = 512) -> float:
    """Mean over all positions of KL(ref || cand), the harness's metric, in chunks of `chunk` positions."""
    ref = ref_logits.reshape(-1, ref_logits.shape[-1])  # (positions, vocab)
    cand = cand_logits.reshape(-1, cand_logits.shape[-1])
    total = sum(float(kl_per_position(ref[i:i + chunk], cand[i:i + chunk]).sum()) for i in range(0, len(ref), chunk))
    return total / len(ref)


def param_count(model: Any) -> int:
    """Parameters, a tied embedding counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
