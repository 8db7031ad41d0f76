"""Accuracy metrics, the one place KL is computed.

KL(reference || candidate) per position (`kl_per_position` on torch tensors: the harness, the quantize stage's
probe, prune and distill all use it), top-1 agreement, perplexity of both on the true next token, greedy-match
length, and SQNR for comparing tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

NONFINITE_PENALTY = 100.0  # nats: the KL/NLL charged at a position whose candidate logits hold NaN/inf


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    import torch

    return torch.log_softmax(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), dim=-1).numpy()


def kl_per_position(ref_logits: torch.Tensor, cand_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(ref/T) || softmax(cand/T)) in nats at each position: (..., vocab) -> (...)."""
    import torch

    ref = torch.log_softmax(ref_logits.float() / temperature, dim=-1)
    cand = torch.log_softmax(cand_logits.float() / temperature, dim=-1)
    return (ref.exp() * (ref - cand)).sum(-1)


def mean_kl(ref_logits: torch.Tensor, cand_logits: torch.Tensor, chunk: int = 512) -> float:
    """Mean over all positions of KL(ref || cand), in chunks of `chunk` positions (a 49k vocabulary never needs
    two full copies)."""
    import torch

    with torch.no_grad():
        ref = ref_logits.reshape(-1, ref_logits.shape[-1])  # (positions, vocab)
        cand = cand_logits.reshape(-1, cand_logits.shape[-1])
        total = sum(float(kl_per_position(ref[i:i + chunk], cand[i:i + chunk]).sum())
                    for i in range(0, len(ref), chunk))
    return total / len(ref)


def position_kl(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """KL(ref || cand) at each position of numpy logits, (positions,), in nats; float rounding clamped at 0."""
    import torch

    kl = kl_per_position(torch.from_numpy(np.ascontiguousarray(ref_logits, dtype=np.float32)),
                         torch.from_numpy(np.ascontiguousarray(cand_logits, dtype=np.float32)))  # (positions,)
    return kl.double().clamp_min(0.0).numpy()


def param_count(model: Any) -> int:
    """Parameters, a tied embedding counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def next_token_nll(logits: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of tokens[i+1] given logits[i], (positions - 1,)."""
    logp = _log_softmax(logits[:-1])  # (positions - 1, vocab)
    targets = np.asarray(tokens[1:], dtype=np.int64)
    return -logp[np.arange(len(targets)), targets].astype(np.float64)


@dataclass
class AccuracyAccumulator:
    """Collects per-position numbers over many windows; `result()` summarises them."""

    kl: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)
    ref_nll: list[np.ndarray] = field(default_factory=list)
    cand_nll: list[np.ndarray] = field(default_factory=list)
    nonfinite: int = 0

    def add(self, ref_logits: np.ndarray, cand_logits: np.ndarray, tokens: Sequence[int]) -> None:
        if ref_logits.shape != cand_logits.shape:
            raise ValueError(f"logits shape {cand_logits.shape} differs from the reference's {ref_logits.shape}")
        # A NaN/inf logit (e.g. an fp16 overflow) is a broken position: charge it a penalty far above any
        # budget instead of letting NaN poison the means or crash the run.
        bad = ~np.isfinite(cand_logits).all(-1)  # (positions,)
        safe = np.where(bad[:, None], 0.0, cand_logits).astype(np.float32)
        kl = position_kl(ref_logits, safe)
        kl[bad] = NONFINITE_PENALTY
        nll = next_token_nll(safe, tokens)
        nll[bad[:-1]] = NONFINITE_PENALTY
        self.kl.append(kl)
        self.top1.append((ref_logits.argmax(-1) == safe.argmax(-1)) & ~bad)
        self.ref_nll.append(next_token_nll(ref_logits, tokens))
        self.cand_nll.append(nll)
        self.nonfinite += int(bad.sum())

    def result(self) -> dict[str, float]:
        kl = np.concatenate(self.kl)
        ref_ppl = math.exp(float(np.concatenate(self.ref_nll).mean()))
        cand_ppl = math.exp(min(float(np.concatenate(self.cand_nll).mean()), 700.0))
        return {
            "positions": int(kl.size),
            "mean_kl": float(kl.mean()),
            "p99_kl": float(np.percentile(kl, 99)),
            "max_kl": float(kl.max()),
            "top1_agreement": float(np.concatenate(self.top1).mean()),
            "reference_perplexity": ref_ppl,
            "perplexity": cand_ppl,
            "perplexity_ratio": cand_ppl / ref_ppl,
            "nonfinite_positions": self.nonfinite,
        }


def greedy_match(reference: Sequence[int], candidate: Sequence[int]) -> int:
    """Tokens identical before the first divergence."""
    n = 0
    for a, b in zip(reference, candidate):
        if a != b:
            break
        n += 1
    return n


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    noise = float(np.sum((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)
