"""Runtimes: each loads one artifact format and exposes the Session protocol (see base.py), registered under
the name each declares."""

from __future__ import annotations

from compress.runtimes.base import Runtime
from compress.runtimes.coreai import CoreAIRuntime
from compress.runtimes.coreml import CoreMLRuntime
from compress.runtimes.executorch import ExecuTorchRuntime
from compress.runtimes.llamacpp import LlamaCppRuntime
from compress.runtimes.onnxruntime import OnnxRuntimeRuntime
from compress.runtimes.torch_eager import TorchEagerRuntime

from compress.registry import Registry

RUNTIMES: Registry[Runtime] = Registry("runtime")
for _runtime in (TorchEagerRuntime(), ExecuTorchRuntime(), OnnxRuntimeRuntime(), LlamaCppRuntime(), CoreMLRuntime(),
                 CoreAIRuntime()):
    RUNTIMES.register(_runtime.name, _runtime)
