"""Exporters, one file per format, registered by format name (see base.py for the protocol)."""

from __future__ import annotations

from compress.registry import Registry
from compress.targets import Format
from exporters.base import Exporter
from exporters.coreml import CoreMLExporter
from exporters.executorch import ExecuTorchExporter
from exporters.gguf import GgufExporter
from exporters.onnx import OnnxExporter
from exporters.safetensors import SafetensorsExporter

EXPORTERS: Registry[Exporter] = Registry("exporter")
EXPORTERS.register(Format.SAFETENSORS.value, SafetensorsExporter())
EXPORTERS.register(Format.PTE.value, ExecuTorchExporter())
EXPORTERS.register(Format.ONNX.value, OnnxExporter())
EXPORTERS.register(Format.GGUF.value, GgufExporter())
EXPORTERS.register(Format.MLPACKAGE.value, CoreMLExporter())
