"""Runtimes: each loads one artifact format and exposes the Session protocol (see base.py)."""

from __future__ import annotations

from compress.runtimes.base import Runtime
from compress.runtimes.coreml import CoreMLRuntime
from compress.runtimes.executorch import ExecuTorchRuntime
from compress.runtimes.llamacpp import LlamaCppRuntime
from compress.runtimes.onnxruntime import OnnxRuntimeRuntime
from compress.runtimes.torch_eager import TorchEagerRuntime

from compress.artifact import RuntimeName
from compress.registry import Registry

RUNTIMES: Registry[Runtime] = Registry("runtime")
RUNTIMES.register(RuntimeName.TORCH_EAGER.value, TorchEagerRuntime())
RUNTIMES.register(RuntimeName.EXECUTORCH.value, ExecuTorchRuntime())
RUNTIMES.register(RuntimeName.ONNXRUNTIME.value, OnnxRuntimeRuntime())
RUNTIMES.register(RuntimeName.LLAMACPP.value, LlamaCppRuntime())
RUNTIMES.register(RuntimeName.COREML.value, CoreMLRuntime())
