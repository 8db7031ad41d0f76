"""Exporters, one file per format, registered by format name (see base.py for the protocol)."""

from __future__ import annotations

from compress.exporters.base import Exporter
from compress.exporters.coreml import CoreMLExporter
from compress.exporters.executorch import ExecuTorchExporter
from compress.exporters.gguf import GgufExporter
from compress.exporters.onnx import OnnxExporter
from compress.exporters.safetensors import SafetensorsExporter

from compress.artifact import Format
from compress.registry import Registry

EXPORTERS: Registry[Exporter] = Registry("exporter")
EXPORTERS.register(Format.SAFETENSORS.value, SafetensorsExporter())
EXPORTERS.register(Format.PTE.value, ExecuTorchExporter())
EXPORTERS.register(Format.ONNX.value, OnnxExporter())
EXPORTERS.register(Format.GGUF.value, GgufExporter())
EXPORTERS.register(Format.MLPACKAGE.value, CoreMLExporter())
