"""Rotations of the residual stream (QuaRot / SpinQuant style), absorbed into the weights: the model computes the
same function, and its weights and activations lose the few huge channels that make 4-bit grids coarse.

With every RMSNorm gain folded into the linears that read it (compress.models.transforms), an RMSNorm commutes
with any orthogonal Q (rms(xQ) = rms(x)). So the residual stream can be carried rotated, h' = h Q: the
embedding becomes E Q, every linear that reads the stream W Q (q, k, v, gate, up, lm_head) and every linear
that writes it Q^T W (o, down). Inside attention, each value head can be rotated too (v rows by H^T, o columns
by H, per head). The result is an ordinary Llama (unit norm gains) that every exporter takes, with one cost:
the final norm's gain folded into the lm_head unties it from the embedding (one more vocab x hidden matrix).

Q is a randomized Hadamard matrix (random signs times a Hadamard matrix, scaled): Sylvester's construction for
powers of two, times Paley's for the odd part where one exists (576 = 72 x 8, 960 = 60 x 16, 3072 = 12 x 256);
otherwise a random orthogonal matrix (QR of a Gaussian).
"""

from __future__ import annotations

from typing import Any

import torch


def rotate(model: Any, seed: int) -> Any:
    """A rotated copy of `model`: same outputs (to float rounding), untied, unit norm gains."""
    import copy

    from compress.models.transforms import fold_norm_gains

    model = fold_norm_gains(copy.deepcopy(model), final=True)
    config = model.config
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("rotation needs a Llama without linear biases")
    gen = torch.Generator().manual_seed(seed)
    q = random_hadamard(config.hidden_size, gen)  # (hidden, hidden) float64
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    qh = random_hadamard(head_dim, gen)  # (head_dim, head_dim)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.copy_((emb.double() @ q).float())
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                _set(linear, linear.weight.double() @ q)  # reads h Q
            for linear in (attn.o_proj, mlp.down_proj):
                _set(linear, q.T @ linear.weight.double())  # writes (y) Q
            v = attn.v_proj.weight.double().reshape(-1, head_dim, config.hidden_size)  # (kv_heads, d, hidden)
            _set(attn.v_proj, (qh.T @ v).reshape(-1, config.hidden_size))
            o = attn.o_proj.weight.double().reshape(config.hidden_size, -1, head_dim)  # (hidden, heads, d)
            _set(attn.o_proj, (o @ qh).reshape(config.hidden_size, -1))
        _set(model.lm_head, model.lm_head.weight.double() @ q)
    return model


def random_hadamard(n: int, gen: torch.Generator) -> torch.Tensor:
    """An n x n orthogonal matrix: diag(random signs) @ H / sqrt(n) for a Hadamard H when one is constructed
    here, else the Q of a Gaussian's QR. float64."""
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    h = hadamard(n)
    if h is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))
    return signs.unsqueeze(1) * h / n ** 0.5


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (entries +-1, H H^T = n I), or None when none is constructed here."""
    power = 1
    while n % (power * 2) == 0:
        power *= 2
    for two in _powers_down(power):
        odd = n // two
        base = _paley(odd)
        if base is not None:
            return torch.kron(base, _sylvester(two))
    return None


def _powers_down(power: int) -> list[int]:
    out = []
    while power >= 1:
        out.append(power)
        power //= 2
    return out


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley(n: int) -> torch.Tensor | None:
    """Paley's construction I (n = q + 1, q prime = 3 mod 4) or II (n = 2(q + 1), q prime = 1 mod 4); 1 and 2
    trivially. None otherwise."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n == 2:
        return _sylvester(2)
    q = n - 1
    if _is_prime(q) and q % 4 == 3:
        s = _conference(q)  # (q+1, q+1), skew
        return s + torch.eye(n, dtype=torch.float64)
    if n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        c = _conference(n // 2 - 1)  # symmetric
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        two = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, one) + torch.kron(torch.eye(n // 2, dtype=torch.float64), two)
    return None


def _conference(q: int) -> torch.Tensor:
    """The (q+1) x (q+1) conference matrix from the quadratic character mod a prime q."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if i in squares else -1.0 for i in range(1, q)], dtype=torch.float64)
    jac = torch.stack([torch.roll(chi, i) for i in range(q)])  # jac[i, j] = chi(j - i)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = -1.0 if q % 4 == 3 else 1.0
    c[1:, 1:] = jac
    return c


def _is_prime(k: int) -> bool:
    return k >= 2 and all(k % d for d in range(2, int(k ** 0.5) + 1))


def _set(linear: Any, weight: torch.Tensor) -> None:
    linear.weight.copy_(weight.float())
