"""llama-cpp-python as a library: whether it is installed, and its module with llama.cpp's log quietened.

Shared by the GGUF exporter (llama.cpp's own quantizer) and the llama.cpp runtime, which must not import
each other.
"""

from __future__ import annotations

import importlib.util
from typing import Any

INSTALL_HINT = "pip install 'compress[llamacpp]' (builds llama.cpp from source: ~10 min on 2 cores)"


def installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_quiet() -> Any:
    """The `llama_cpp` module, with llama.cpp's log (routed by llama-cpp-python through its Python logger)
    reduced to errors: below that it is per-tensor load and quantization chatter."""
    import logging

    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp
