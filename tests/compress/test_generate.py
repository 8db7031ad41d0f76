"""`compress generate`'s token choice: greedy is the argmax, sampling follows softmax(logits / T), and top-p keeps
the smallest set of most likely tokens whose probability reaches p (never sampling outside it)."""

from __future__ import annotations

import numpy as np
import pytest

from compress.errors import InputError
from compress.generate import Sampling, pick

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=np.float32)
DRAWS = 20000


def _frequencies(sampling: Sampling) -> np.ndarray:
    rng = np.random.default_rng(0)
    counts = np.bincount([pick(LOGITS, sampling, rng) for _ in range(DRAWS)], minlength=len(LOGITS))
    return counts / DRAWS


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def test_greedy_is_the_argmax_whatever_the_generator():
    rng = np.random.default_rng(1)
    shuffled = np.random.default_rng(2).permutation(LOGITS)
    assert all(pick(shuffled, Sampling(), rng) == int(np.argmax(shuffled)) for _ in range(20))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampling_follows_the_softmax_at_its_temperature(temperature):
    expected = _softmax(LOGITS.astype(np.float64) / temperature)
    got = _frequencies(Sampling(temperature=temperature))
    # 20000 draws: a frequency's standard error is at most 0.0036, so 0.015 is > 4 sigma
    np.testing.assert_allclose(got, expected, atol=0.015)
    other = _softmax(LOGITS.astype(np.float64) / (temperature * 2))
    assert np.abs(got - other).max() > 0.03  # the temperature really changes the distribution


def test_top_p_samples_the_nucleus_renormalised_and_nothing_outside_it():
    p = _softmax(LOGITS.astype(np.float64))  # 0.574, 0.211, 0.128, 0.078, ...
    got = _frequencies(Sampling(temperature=1.0, top_p=0.8))
    # 0.574 + 0.211 = 0.785 < 0.8, so the third token completes the nucleus; the rest are never drawn
    nucleus = p[:3] / p[:3].sum()
    np.testing.assert_allclose(got[:3], nucleus, atol=0.015)
    assert got[3:].sum() == 0
    assert pick(LOGITS, Sampling(temperature=1.0, top_p=0.5), np.random.default_rng(3)) == 0  # top token alone


def test_sampling_is_reproducible_from_its_seed():
    draw = lambda seed: [pick(LOGITS, Sampling(temperature=1.0), rng) for rng in [np.random.default_rng(seed)]
                         for _ in range(50)]
    assert draw(5) == draw(5) and draw(5) != draw(6)


@pytest.mark.parametrize("kwargs, message", [({"temperature": -0.1}, "--temperature"), ({"top_p": 0.0}, "--top-p"),
                                             ({"top_p": 1.5}, "--top-p"), ({"max_tokens": 0}, "--max-tokens")])
def test_bad_sampling_settings_are_refused_in_one_line(kwargs, message):
    with pytest.raises(InputError, match=message):
        Sampling(**kwargs)
