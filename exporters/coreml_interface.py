"""What coremltools needs and what Xcode shows for each of the package's two interfaces (compress/coreml_io.py names
them; exporters/coreml.py describes them): the trace's example inputs, the converter's input and state types, the
descriptions of every input, output and state, and the sidecar's account of them."""

from __future__ import annotations

from typing import Any

from compress.coreml_io import (
    CAUSAL_MASK,
    INPUT_IDS,
    INPUT_POS,
    KEY_CACHE,
    LOGITS,
    TOKENS,
    VALUE_CACHE,
    CoreMLIO,
)


def trace_example(io: CoreMLIO, lengths: tuple[int, ...]) -> tuple[Any, Any]:
    """Inputs to trace with. apple_llama: 2 tokens after 3 cached ones, so that no size is 1 (a trace would fold
    a size-1 axis away) and the query and mask lengths differ."""
    import torch

    if io is CoreMLIO.APPLE_LLAMA:
        return torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 5)
    return torch.zeros(1, lengths[-1], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)


def converter_io(io: CoreMLIO, module: Any, max_context: int, lengths: tuple[int, ...]) -> tuple[list, list, str]:
    """(inputs, states, a line for the progress output) for `ct.convert`."""
    import coremltools as ct
    import numpy as np

    caches = [(name, buf) for name, buf in module.named_buffers()
              if name in (KEY_CACHE, VALUE_CACHE) or name.endswith("_cache")]
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(buf.shape), dtype=np.float16), name=name)
              for name, buf in caches]
    if io is CoreMLIO.APPLE_LLAMA:
        # The mask's query axis is its own range: swift-transformers sends (1, 1, 1, end) even when prefilling.
        query = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
        mask_query = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
        end = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
        inputs = [ct.TensorType(INPUT_IDS, shape=(1, query), dtype=np.int32),
                  ct.TensorType(CAUSAL_MASK, shape=(1, 1, mask_query, end), dtype=np.float16)]
        return inputs, states, f"query length 1..{max_context} (ranged), states {KEY_CACHE}, {VALUE_CACHE}"
    shape = (ct.EnumeratedShapes(shapes=[[1, n] for n in lengths], default=[1, lengths[-1]])
             if len(lengths) > 1 else (1, lengths[0]))
    inputs = [ct.TensorType(TOKENS, shape=shape, dtype=np.int32), ct.TensorType(INPUT_POS, shape=(1,), dtype=np.int32)]
    return inputs, states, f"query lengths {list(lengths)}, {len(states)} states"


def describe_io(mlmodel: Any, io: CoreMLIO, max_context: int, lengths: tuple[int, ...]) -> None:
    """A description on every input, output and state, as Xcode's model page shows them."""
    mlmodel.output_description[LOGITS] = "Next-token logits for each of the q positions, shape (1, q, vocabulary)"
    if io is CoreMLIO.APPLE_LLAMA:
        mlmodel.input_description[INPUT_IDS] = (f"Token ids, shape (1, q), q in 1..{max_context}: the prompt (or a "
                                                f"chunk of it), then one token per decode step")
        mlmodel.input_description[CAUSAL_MASK] = (
            "Additive attention mask, fp16, shape (1, 1, q, end) or (1, 1, 1, end): end is the number of tokens "
            "cached after this call, so the call's first position is end - q; 0 where a query may look, -inf "
            "where not (a causal mask is also applied inside the model)")
        for state in mlmodel._spec.description.state:  # coremltools has no setter for states' descriptions
            kind = "keys" if state.name == KEY_CACHE else "values"
            state.shortDescription = (f"Every layer's cached {kind}, fp16 (layers, 1, kv heads, {max_context} "
                                      f"positions, head dim)")
        return
    mlmodel.input_description[TOKENS] = (f"Token ids, shape (1, q), q in {list(lengths)}: q = 1 decodes one token, "
                                         f"longer calls prefill a prompt in chunks")
    mlmodel.input_description[INPUT_POS] = "Cache position of the first of this call's tokens, shape (1,)"
    for state in mlmodel._spec.description.state:
        layer, kind = state.name.split("_")[1], "keys" if state.name.endswith("k_cache") else "values"
        state.shortDescription = f"Layer {layer}'s cached {kind}, fp16 (1, kv heads, positions, head dim)"


def interface_record(io: CoreMLIO, module: Any, precision: str) -> dict[str, Any]:
    """The sidecar's inputs, outputs and states."""
    states = [name.replace(".", "_") for name, _ in module.named_buffers()
              if name in (KEY_CACHE, VALUE_CACHE) or name.endswith("_cache")]
    if io is CoreMLIO.APPLE_LLAMA:
        inputs = {INPUT_IDS: "(1, q) int32, q in 1..max_context",
                  CAUSAL_MASK: "(1, 1, q or 1, end) float16, additive; first position = end - q"}
    else:
        inputs = {TOKENS: "(1, q) int32, q in query_lengths", INPUT_POS: "(1,) int32"}
    return {"inputs": inputs, "outputs": {LOGITS: f"(1, q, vocab) {precision}"}, "states": states}
