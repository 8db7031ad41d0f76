"""The same quantize-stage codes through both Apple paths: a Core ML package run by our MIL interpreter and a Core AI
asset run by Apple's own runtime (coreai-core's interpreter). Apple's code is the check on ours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coremltools")
pytest.importorskip("coreai_torch")
pytest.importorskip("coreai")

from compress.exporters.coreai import AimodelOptions, CoreAIExporter
from compress.exporters.coreml import ComputeUnits, CoreMLExporter, MlpackageOptions
from compress.runtimes.coreai import CoreAIRuntime
from compress.runtimes.coreml import CoreMLRuntime
from compress.runtimes.fp16_sums import sequential_fp16_linear

from compress.artifact import Dtype
from compress.metrics import position_kl
from compress.models.tiny import byte_tokenizer, tiny_llama
from compress.progress import Console
from compress.quantized import Precision, QuantizeConfig
from compress.stages.quant_plan import quantize_model

QUIET = Console(quiet=True)
TOKENS = list(range(10, 42))
INT4 = QuantizeConfig(weight_bits=4, group_size=32, embedding=Precision.INT8, lm_head=Precision.INT8)


@pytest.fixture(scope="module")
def staged():
    return quantize_model(tiny_llama(seed=0), INT4)


def _logits(session) -> np.ndarray:
    """Prefill 16 tokens, decode the rest one by one."""
    return np.concatenate([session.prefill(TOKENS[:16])] + [session.decode(t)[None] for t in TOKENS[16:]])


def _both(staged, root: Path, precision: Dtype) -> tuple[np.ndarray, np.ndarray]:
    model, codes = staged
    coreml = CoreMLExporter().export(model, byte_tokenizer(), MlpackageOptions(
        max_context=64, compute_units=ComputeUnits.CPU_AND_GPU, compute_precision=precision),
        root / "coreml", QUIET, codes)
    coreai = CoreAIExporter().export(model, byte_tokenizer(), AimodelOptions(max_context=64, compute_precision=precision),
                                     root / "coreai", QUIET, codes)
    return _logits(CoreMLRuntime().load(coreml, threads=2)), _logits(CoreAIRuntime().load(coreai, threads=2))


def test_at_fp32_our_interpreter_and_apples_runtime_compute_the_same_logits(staged, tmp_path):
    """fp32 weights from the same codes, fp16 KV caches in both: what separates the two is float summation order,
    and where a key or value lands on the other side of an fp16 rounding boundary, one fp16 step of it (measured:
    median 5e-6, max 1e-3 on logits up to 23.5)."""
    ours, apples = _both(staged, tmp_path, Dtype.FLOAT32)
    np.testing.assert_allclose(ours, apples, atol=2e-3, rtol=0)
    assert float(np.median(np.abs(ours - apples))) < 5e-5
    assert float(np.mean(position_kl(ours.astype(np.float64), apples.astype(np.float64)))) < 1e-6


def test_at_fp16_the_two_paths_agree_within_fp16_arithmetic(staged, tmp_path):
    """fp16 programs: Core ML's offsets are -offset/scale in fp16, Core AI's are the offsets in fp16, and each
    runtime has its own fp16 arithmetic, so they differ by fp16 rounding, not by an op meaning something else
    (measured: max 0.082, median 0.012 on logits up to 23.5, where one fp16 step is 0.016; mean KL 7e-5)."""
    ours, apples = _both(staged, tmp_path, Dtype.FLOAT16)
    assert float(np.abs(ours - apples).max()) < 0.15
    assert float(np.mean(position_kl(ours.astype(np.float64), apples.astype(np.float64)))) < 5e-4
    assert np.mean(ours.argmax(1) == apples.argmax(1)) >= 0.95


def test_apples_interpreter_sums_fp16_dot_products_sequentially_in_fp16(tmp_path):
    """What docs/coreai.md reports of Apple's Linux interpreter (coreai-core 1.0.0b3): an fp16 linear's output is
    the left-to-right fp16 sum of fp16-rounded products, bit for bit; with 8192 positive terms that stalls at
    ~50 where the true sum is ~81 (fp32 accumulation: 3e-4 relative error). Our MIL interpreter accumulates in
    fp32 by default; its fp16_accumulation bound (runtimes/fp16_sums.py) must compute exactly what Apple's does.
    This pins both, so a coreai-core that changes is noticed."""
    import asyncio
    import contextlib
    import io

    import coreai_torch
    import torch
    from coreai.authoring import AIModelAsset
    from coreai.runtime import NDArray

    gen = torch.Generator().manual_seed(0)
    weight = (torch.rand(4, 8192, generator=gen) * 0.01 + 0.005).half()
    x = (torch.rand(1, 8192, generator=gen) + 0.5).half()

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(weight)

        def forward(self, v):
            return torch.nn.functional.linear(v, self.weight)

    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    converter.add_pytorch_module(Linear().eval(), export_fn=lambda m: torch.export.export(m, args=(x,))
                                 .run_decompositions(coreai_torch.get_decomp_table()),
                                 input_names=["x"], output_names=["y"], entrypoint_name="main")
    with contextlib.redirect_stdout(io.StringIO()):
        converter.to_coreai().save_asset(tmp_path / "linear.aimodel")

    async def run() -> np.ndarray:
        async with AIModelAsset.load(tmp_path / "linear.aimodel").executable() as model:
            function = model.load_function("main")
            function = await function if asyncio.iscoroutine(function) else function
            return np.asarray((await function({"x": NDArray(x.numpy())}, {}))["y"].numpy())[0]

    got = asyncio.run(run())
    w, v = weight.numpy(), x.numpy()[0]
    sequential = np.zeros(4, np.float16)
    for k in range(v.size):
        sequential = (sequential + (w[:, k] * v[k]).astype(np.float16)).astype(np.float16)
    exact = w.astype(np.float64) @ v.astype(np.float64)
    np.testing.assert_array_equal(got, sequential)
    np.testing.assert_array_equal(sequential_fp16_linear(v[None], w.T)[0], got)  # the bound's arithmetic
    assert np.all(got < 0.7 * exact)  # stalled far below the true sum
    np.testing.assert_allclose(w.astype(np.float32) @ v.astype(np.float32), exact, rtol=1e-3)
