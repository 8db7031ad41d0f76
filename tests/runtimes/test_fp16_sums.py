"""The fp16 summation Apple's Core AI interpreter does (tests/test_apple_paths.py pins it on Apple's runtime),
emulated for the MIL interpreter's fp16_accumulation bound."""

from __future__ import annotations

import numpy as np
import pytest
from compress.runtimes.fp16_sums import sequential_fp16_linear, sequential_fp16_matmul


def _loop(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The definition, one scalar at a time in numpy fp16: round each product, round after each addition."""
    out = np.zeros((a.shape[0], b.shape[1]), np.float16)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            acc = np.float16(0)
            for k in range(a.shape[1]):
                acc = np.float16(acc + np.float16(a[i, k] * b[k, j]))
            out[i, j] = acc
    return out


def test_matches_the_scalar_definition_bit_for_bit_and_differs_from_fp32_accumulation():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 3, (5, 300)).astype(np.float16)
    b = rng.normal(0, 0.05, (300, 7)).astype(np.float16)
    got = sequential_fp16_matmul(a, b)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, _loop(a, b))
    fp32 = (a.astype(np.float32) @ b.astype(np.float32)).astype(np.float16)
    assert np.any(got != fp32)  # 300 terms: the partial sums' rounding shows


def test_broadcasts_leading_axes_like_matmul_and_the_linear_form_agrees():
    rng = np.random.default_rng(1)
    q = rng.normal(0, 1, (1, 3, 4, 16)).astype(np.float16)
    k = rng.normal(0, 1, (1, 1, 16, 9)).astype(np.float16)
    got = sequential_fp16_matmul(q, k)
    assert got.shape == (1, 3, 4, 9)
    for h in range(3):
        np.testing.assert_array_equal(got[0, h], _loop(q[0, h], k[0, 0]))
    x = rng.normal(0, 1, (2, 3, 16)).astype(np.float16)
    w = rng.normal(0, 1, (9, 16)).astype(np.float16)
    np.testing.assert_array_equal(sequential_fp16_linear(x, w.T).reshape(6, 9), _loop(x.reshape(6, 16), w.T))
    with pytest.raises(ValueError, match="contraction axes differ"):
        sequential_fp16_matmul(q, k[..., :8, :])


def test_a_long_positive_sum_stalls_as_fp16_does():
    """8192 terms of ~0.01: the accumulator stops growing once a term is under half an fp16 step of it."""
    a = np.full((1, 8192), 0.01, np.float16)
    got = float(sequential_fp16_matmul(a, np.ones((8192, 1), np.float16))[0, 0])
    assert got == 32.0  # fp16 steps are 0.03125 from 32 on: 0.01 rounds away; the true sum is 81.9
