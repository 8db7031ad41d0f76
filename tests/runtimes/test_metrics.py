from __future__ import annotations

import math

import numpy as np
import pytest

from compress.metrics import AccuracyAccumulator, greedy_match, next_token_nll, position_kl, sqnr_db


def _manual_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    p = np.exp(p_logits - p_logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(q_logits - q_logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    return (p * (np.log(p) - np.log(q))).sum(-1)


def test_kl_matches_the_definition_and_is_zero_for_identical_logits():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(5, 11)).astype(np.float32) * 3
    cand = ref + rng.normal(size=ref.shape).astype(np.float32)
    np.testing.assert_allclose(position_kl(ref, cand), _manual_kl(ref.astype(np.float64), cand.astype(np.float64)),
                               rtol=1e-4, atol=1e-6)
    assert np.all(position_kl(ref, ref) == 0.0)
    assert np.all(position_kl(ref, ref + 7.0) < 1e-6)  # a constant shift is the same distribution


def test_perplexity_and_top1_over_windows():
    vocab = 4
    tokens = [0, 1, 2, 3]
    ref = np.full((4, vocab), -10.0, dtype=np.float32)
    ref[np.arange(3), [1, 2, 3]] = 10.0  # the reference predicts every next token
    cand = np.zeros((4, vocab), dtype=np.float32)  # the candidate is uniform
    acc = AccuracyAccumulator()
    acc.add(ref, cand, tokens)
    result = acc.result()
    assert result["positions"] == 4
    assert result["perplexity"] == pytest.approx(4.0, rel=1e-5)  # uniform over 4 tokens
    assert result["reference_perplexity"] == pytest.approx(1.0, abs=1e-6)
    assert result["perplexity_ratio"] == pytest.approx(4.0, rel=1e-5)
    assert result["top1_agreement"] == 0.25  # argmax of uniform is 0; the reference agrees only at the last row
    np.testing.assert_allclose(next_token_nll(cand, tokens), [math.log(4)] * 3, rtol=1e-6)


def test_non_finite_candidate_logits_count_as_divergence_not_a_crash():
    ref = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]], dtype=np.float32)
    cand = np.array([[np.nan, 0.0, 0.0], [0.0, 5.0, 0.0]], dtype=np.float32)
    acc = AccuracyAccumulator()
    acc.add(ref, cand, [0, 1])
    result = acc.result()
    assert result["nonfinite_positions"] == 1
    assert result["mean_kl"] == pytest.approx(50.0, abs=1e-3)  # (100 + 0) / 2
    assert result["top1_agreement"] == 0.5 and np.isfinite(result["perplexity"])


def test_greedy_match_and_sqnr():
    assert greedy_match([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert greedy_match([1, 2], [1, 2]) == 2
    assert greedy_match([5], [6]) == 0
    x = np.ones(100)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0, abs=1e-9)  # noise 0.1 -> 20 dB
