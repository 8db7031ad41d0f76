"""Walking a Llama decoder layer by layer on calibration text: the first layer's inputs, one layer's output, and
the X^T X of its linears' inputs. Shared by the stages that solve a least-squares problem per layer (GPTQ's
rounding, the prune stage's reconstruction), so every layer sees the inputs the layers before it, already changed,
produce."""

from __future__ import annotations

from typing import Any

import torch


class _Stop(Exception):
    """Raised by the hook that captures the first decoder layer's inputs, so the rest of the model never runs."""


def first_layer_inputs(model: Any, windows: list[list[int]]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The first decoder layer's hidden states and keyword arguments (rotary embeddings, mask) for the windows."""
    captured: dict[str, Any] = {}

    def grab(_module: Any, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = kwargs
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor(windows, device=model.device), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in captured["kwargs"].items() if k != "hidden_states"}
    return captured["hidden"], kwargs


def input_grams(layer: Any, linears: dict[str, Any], hidden: torch.Tensor, kwargs: dict) -> dict[str, torch.Tensor]:
    """X^T X (fp32) of each linear's input over every calibration token, from one forward pass of the layer.
    Linears that read the same tensor (q/k/v, gate/up) share one product: the same numbers, computed once."""
    sums: dict[str, torch.Tensor] = {}
    # id of an input tensor -> (the tensor, its X^T X); holding the tensor keeps its id from being reused
    by_input: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, m in linears.items():
        def hook(_m: Any, args: tuple, _out: Any, name: str = name) -> None:
            if id(args[0]) not in by_input:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
                by_input[id(args[0])] = (args[0], x.T @ x)
            sums[name] = by_input[id(args[0])][1]
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name in linears if name not in sums]
    if missing:
        raise RuntimeError(f"no calibration input reached {missing[:3]}")
    return sums


def layer_output(out: Any) -> torch.Tensor:
    """A decoder layer's hidden states, whether the layer returns a tensor or a tuple."""
    return out[0] if isinstance(out, tuple) else out
