"""Exporters, one file per format, registered under the format name each declares (base.py: the protocol).

Each exporter module is light to import (heavy libraries load inside its functions), because reading
targets.yaml looks up a format's options and runtimes here.
"""

from __future__ import annotations

from compress.exporters.base import Exporter
from compress.exporters.coreai import CoreAIExporter
from compress.exporters.coreml import CoreMLExporter
from compress.exporters.executorch import ExecuTorchExporter
from compress.exporters.gguf import GgufExporter
from compress.exporters.onnx import OnnxExporter
from compress.exporters.safetensors import SafetensorsExporter

from compress.registry import Registry

EXPORTERS: Registry[Exporter] = Registry("format")
for _exporter in (SafetensorsExporter(), ExecuTorchExporter(), OnnxExporter(), GgufExporter(), CoreMLExporter(),
                  CoreAIExporter()):
    EXPORTERS.register(_exporter.format, _exporter)
