"""Runtimes: each loads one artifact format and exposes the Session protocol (see base.py)."""

from __future__ import annotations

from compress.registry import Registry
from compress.targets import RuntimeName
from runtimes.base import Runtime
from runtimes.coreml import CoreMLRuntime
from runtimes.executorch import ExecuTorchRuntime
from runtimes.llamacpp import LlamaCppRuntime
from runtimes.onnxruntime import OnnxRuntimeRuntime
from runtimes.torch_eager import TorchEagerRuntime

RUNTIMES: Registry[Runtime] = Registry("runtime")
RUNTIMES.register(RuntimeName.TORCH_EAGER.value, TorchEagerRuntime())
RUNTIMES.register(RuntimeName.EXECUTORCH.value, ExecuTorchRuntime())
RUNTIMES.register(RuntimeName.ONNXRUNTIME.value, OnnxRuntimeRuntime())
RUNTIMES.register(RuntimeName.LLAMACPP.value, LlamaCppRuntime())
RUNTIMES.register(RuntimeName.COREML.value, CoreMLRuntime())
