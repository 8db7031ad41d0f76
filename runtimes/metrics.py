"""Accuracy metrics, position by position against the reference's logits.

KL(reference || candidate) per position, top-1 agreement, perplexity of both on the true next token,
greedy-match length, and SQNR for comparing tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    import torch

    return torch.log_softmax(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), dim=-1).numpy()


def position_kl(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """KL(ref || cand) at each position, (positions,), in nats; float rounding clamped at 0."""
    import torch

    lr = torch.from_numpy(_log_softmax(ref_logits))  # (positions, vocab)
    lc = torch.from_numpy(_log_softmax(cand_logits))  # (positions, vocab)
    kl = (lr.exp() * (lr - lc)).sum(dim=-1).double()  # (positions,)
    return kl.clamp_min(0.0).numpy()


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

    def add(self, ref_logits: np.ndarray, cand_logits: np.ndarray, tokens: Sequence[int]) -> None:
        if ref_logits.shape != cand_logits.shape:
            raise ValueError(f"logits shape {cand_logits.shape} differs from the reference's {ref_logits.shape}")
        if not np.isfinite(cand_logits).all():
            # A NaN/inf logit is a broken model; record it as maximal divergence rather than crash.
            cand_logits = np.nan_to_num(cand_logits, nan=0.0, posinf=1e4, neginf=-1e4)
        self.kl.append(position_kl(ref_logits, cand_logits))
        self.top1.append(ref_logits.argmax(-1) == cand_logits.argmax(-1))
        self.ref_nll.append(next_token_nll(ref_logits, tokens))
        self.cand_nll.append(next_token_nll(cand_logits, tokens))

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
