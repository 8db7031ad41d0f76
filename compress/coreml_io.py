"""The Core ML package's interface: its input, output and state names in each convention, shared by the exporter
that writes them and the runtime that feeds them (exporters/coreml.py describes both conventions).

`apple_llama` follows Apple's "On Device Llama 3.1 with Core ML" article and swift-transformers' Swift
`LanguageModelWithStatefulKVCache` (Sources/Models/LanguageModel.swift), which takes the stateful path only when
both `keyCache` and `valueCache` states exist and `inputIds` has a ranged length.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import numpy as np


class CoreMLIO(enum.StrEnum):
    APPLE_LLAMA = "apple_llama"  # inputIds, causalMask, keyCache/valueCache; ranged shapes (swift-transformers)
    FIXED_SHAPE = "fixed_shape"  # tokens, input_pos, a state per layer and kind; enumerated query lengths


# apple_llama
INPUT_IDS = "inputIds"  # (1, q) int32, q ranged 1..max_context
CAUSAL_MASK = "causalMask"  # (1, 1, q or 1, end) fp16, additive; the call's first position is end - q
KEY_CACHE = "keyCache"  # (layers, 1, kv heads, max_context, head dim) fp16 state
VALUE_CACHE = "valueCache"
# fixed_shape
TOKENS = "tokens"  # (1, q) int32, q one of the enumerated query lengths
INPUT_POS = "input_pos"  # (1,) int32: the cache position of the call's first token
# both
LOGITS = "logits"  # (1, q, vocab)
HUB_NAME_KEY = "co.huggingface.exporters.name"  # swift-transformers reads the Hub repo id from this metadata key


def convention_of(input_names: Iterable[str]) -> CoreMLIO:
    """Which convention a package follows, from its inputs' names."""
    return CoreMLIO.APPLE_LLAMA if INPUT_IDS in set(input_names) else CoreMLIO.FIXED_SHAPE


def causal_mask(query: int, past: int) -> np.ndarray:
    """The additive mask of Apple's example for `query` tokens after `past` cached ones: (1, 1, query, past + query)
    fp16, 0 where a query may look and -inf on the keys after it."""
    keys = np.arange(past + query)[None, :]
    rows = past + np.arange(query)[:, None]
    return np.where(keys <= rows, 0.0, -np.inf).astype(np.float16)[None, None]
