"""The ONNX Runtime session: the cache's bounds, reset, and a load failure as a one-line error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai")

from compress.exporters.onnx import OnnxExporter, OnnxOptions
from compress.runtimes.base import ContextOverflow
from compress.runtimes.onnxruntime import KvMode, OnnxRuntimeRuntime

from compress.errors import RuntimeUnavailable
from compress.models.tiny import byte_tokenizer, tiny_llama
from compress.progress import Console


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("ort") / "onnx"
    return OnnxExporter().export(tiny_llama(seed=1), byte_tokenizer(), OnnxOptions(max_context=32), out,
                                 Console(quiet=True))


@pytest.mark.parametrize("kv_mode", list(KvMode))
def test_the_session_refuses_to_run_past_max_context(artifact, kv_mode):
    session = OnnxRuntimeRuntime().load(artifact, threads=1, kv_mode=kv_mode)
    assert session.max_context == 32 and session.vocab_size == 259
    session.prefill(list(range(30)))
    session.decode(5)
    session.decode(6)
    with pytest.raises(ContextOverflow, match="position 33 exceeds max_context 32"):
        session.decode(7)


def test_reset_rewinds_so_a_new_sequence_sees_nothing_of_the_old(artifact):
    session = OnnxRuntimeRuntime().load(artifact, threads=1)
    first = session.prefill([3, 4, 5])
    session.prefill(list(range(40, 60)))
    session.reset()
    np.testing.assert_array_equal(session.prefill([3, 4, 5]), first)


def test_weights_can_live_inside_model_onnx_and_give_the_same_logits(artifact, tmp_path):
    """export.external_data: false writes one self-contained graph file (what some loaders want)."""
    single = OnnxExporter().export(tiny_llama(seed=1), byte_tokenizer(),
                                   OnnxOptions(max_context=32, external_data=False), tmp_path / "onnx",
                                   Console(quiet=True))
    assert single.main == "onnx/model.onnx" and single.files.count("onnx/model.onnx") == 1
    assert not any(f.endswith("_data") for f in single.files) and (single.path / single.main).stat().st_size > 100_000
    assert json.loads((single.path / "config.json").read_text())["transformers.js_config"] == {
        "dtype": "fp32", "use_external_data_format": False}
    ids = [7, 8, 9, 10]
    np.testing.assert_array_equal(OnnxRuntimeRuntime().load(single, threads=1).prefill(ids),
                                  OnnxRuntimeRuntime().load(artifact, threads=1).prefill(ids))


def test_a_damaged_model_file_is_a_one_line_runtime_error(artifact, tmp_path):
    broken = tmp_path / "onnx"
    shutil.copytree(artifact.path, broken)
    (broken / artifact.main).write_bytes(b"\x08\x07garbage")
    with pytest.raises(RuntimeUnavailable, match=r"onnxruntime .* cannot load model.onnx") as err:
        OnnxRuntimeRuntime().load(artifact.at(broken), threads=1)
    assert "\n" not in str(err.value)
