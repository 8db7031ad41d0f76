"""fp16 dot products summed the way Apple's Core AI interpreter sums them: each product rounded to fp16, then added
left to right into an fp16 accumulator, rounding after every addition (tests/test_apple_paths.py pins that
behaviour of coreai-core bit for bit). The MIL interpreter uses this for its `fp16_accumulation` bound.

No library computes this: BLAS, numpy and PyTorch accumulate fp16 products in fp32 or in blocks. The loop runs over
the contraction axis with whole (rows x columns) planes per step, in PyTorch fp16 tensors, whose CPU kernels compute
each multiply and add in fp32 and round the result to fp16. For two fp16 operands that is the correctly rounded fp16
result: a product of two 11-bit significands is exact in fp32's 24 bits, and a sum that fp32 rounds is one whose
smaller term lies far below half an fp16 step of the larger, so rounding it again to fp16 cannot land differently.
"""

from __future__ import annotations

import numpy as np


def sequential_fp16_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (..., M, K) @ b (..., K, N) -> (..., M, N) fp16, broadcasting the leading axes like `np.matmul`."""
    import torch

    at = torch.from_numpy(np.ascontiguousarray(np.swapaxes(np.asarray(a, np.float16), -1, -2)))  # (..., K, M)
    bt = torch.from_numpy(np.ascontiguousarray(np.asarray(b, np.float16)))  # (..., K, N)
    k = at.shape[-2]
    if bt.shape[-2] != k:
        raise ValueError(f"contraction axes differ: {a.shape} @ {b.shape}")
    lead = torch.broadcast_shapes(at.shape[:-2], bt.shape[:-2])
    acc = torch.zeros(*lead, at.shape[-1], bt.shape[-1], dtype=torch.float16)
    product = torch.empty_like(acc)
    for i in range(k):
        torch.mul(at[..., i, :].unsqueeze(-1), bt[..., i:i + 1, :], out=product)  # rounded to fp16
        acc.add_(product)  # rounded to fp16 after every addition
    return acc.numpy()


def sequential_fp16_linear(x: np.ndarray, weight_t: np.ndarray) -> np.ndarray:
    """x (..., K) fp16 times weight_t (K, N) fp16 (the linear's weight, transposed) -> (..., N) fp16."""
    rows = np.asarray(x, np.float16).reshape(-1, x.shape[-1])
    return sequential_fp16_matmul(rows, weight_t).reshape(*x.shape[:-1], weight_t.shape[-1])
