"""Execute a Core ML ML program on the CPU, op by op, in the program's own dtypes (Linux has no Core ML).

This checks the numbers of the exact program a phone runs, not of the PyTorch model it came from.
The package's MIL program is loaded with coremltools' own proto loader, and each op is evaluated with
coremltools' per-op `value_inference` (the code its constant folding uses), fed with runtime values.
Every result is cast to the dtype the program declares for it, so fp16 rounding and fp16 overflow
happen where they would on the device. Our own implementations exist only where coremltools has none
or where its one is unusably slow, each saying why:
  - states (`read_state`, `coreml_update_state`): value inference has no notion of a state's storage;
  - `shape`, `reshape`: their value inference reads the declared shape of `x` (symbolic when the query
    length is flexible), not the runtime value's;
  - `reduce_*`: coremltools passes `keep_dims` as a numpy bool, which numpy 2 refuses as `keepdims`;
  - `silu`: coremltools has no value inference for it;
  - `linear` and `matmul`: coremltools multiplies in the inputs' dtype, and numpy has no fp16 BLAS
    (~100x slower than fp32). Here fp16 operands are widened to fp32 (exact), multiplied with fp32
    accumulation and rounded back to fp16: an assumption about the devices (Apple's Core AI interpreter sums in
    fp16; docs/coreml.md). `Accumulation.FP16_SEQUENTIAL` computes fp16 linears and matmuls as that interpreter
    does instead (runtimes/fp16_sums.py): the bound a build reports next to the default.
Constants are materialized once per load: compressed weights (`constexpr_*`) through coremltools'
`materialized_val_inference`, and each linear's weight widened to fp32 once.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from compress.runtimes.fp16_sums import sequential_fp16_linear, sequential_fp16_matmul

_REDUCTIONS = {"reduce_max": np.max, "reduce_min": np.min, "reduce_sum": np.sum, "reduce_mean": np.mean,
               "reduce_prod": np.prod}
WEIGHTS_DIR = Path("Data") / "com.apple.CoreML" / "weights"


class Accumulation(enum.StrEnum):
    """How an fp16 linear or matmul sums its products (fp32 operands always sum in fp32)."""

    FP32 = "fp32"  # widened to fp32, one BLAS call, rounded once to fp16
    FP16_SEQUENTIAL = "fp16_sequential"  # each product and each partial sum rounded to fp16, left to right


class _Value:
    """What coremltools' value inference reads through `var.val` (`var._sym_val.val`)."""

    __slots__ = ("val",)

    def __init__(self, val: Any):
        self.val = val


def load_program(package: Path) -> tuple[Any, Any]:
    """The package's MIL program (coremltools' proto loader) and its model spec."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    spec = ct.utils.load_spec(str(package))
    program = milproto_load(spec, spec.specificationVersion, str(package / WEIGHTS_DIR))
    return program, spec


def _np_dtype(var: Any) -> Any:
    from coremltools.converters.mil.mil import types

    dtype = var.dtype if types.is_tensor(var.sym_type) or types.is_scalar(var.sym_type) else None
    return None if dtype is None else types.nptype_from_builtin(dtype)


class MilInterpreter:
    """One function of a loaded MIL program, ready to run many times; state lives in `self.states`."""

    def __init__(self, program: Any, function: str = "main", accumulation: Accumulation = Accumulation.FP32):
        from coremltools.converters.mil.mil import types

        fn = program.functions[function]
        self._inputs = {name: var for name, var in fn.inputs.items() if not types.is_state(var.sym_type)}
        self._state_vars = {name: var for name, var in fn.inputs.items() if types.is_state(var.sym_type)}
        self.states: dict[str, np.ndarray] = {
            name: np.zeros(var.sym_type.wrapped_type().get_shape(),
                           types.nptype_from_builtin(var.sym_type.wrapped_type().get_primitive()))
            for name, var in self._state_vars.items()}
        self._outputs = list(fn.outputs)
        self.accumulation = accumulation
        self._weights32: dict[str, np.ndarray] = {}
        self._weights16_t: dict[str, np.ndarray] = {}
        self._steps: list[tuple[Any, Callable[[Any], Any], list[tuple[Any, Any]]]] = []
        own = {"read_state": self._read_state, "coreml_update_state": self._update_state,
               "shape": self._shape, "reshape": self._reshape, "silu": self._silu, "linear": self._linear, "matmul": self._matmul}
        for name in _REDUCTIONS:
            own[name] = self._reduce
        for op in fn.operations:
            if op.op_type == "const":
                continue  # value already attached by the loader
            if op.op_type.startswith("constexpr_"):
                # Decompressed once per load, exactly as coremltools defines each compression op.
                op.outputs[0]._sym_val = _Value(op.materialized_val_inference().astype(_np_dtype(op.outputs[0])))
                continue
            outs = [(out, _np_dtype(out)) for out in op.outputs]
            self._steps.append((op, own.get(op.op_type, self._infer), outs))
        for op in fn.operations:
            if op.op_type != "linear" or op.weight.val is None:
                continue
            if self._sums_fp16(op.weight.val):
                self._weights16_t[op.weight.name] = np.ascontiguousarray(op.weight.val.T)
            else:
                self._weights32[op.weight.name] = np.ascontiguousarray(op.weight.val, dtype=np.float32)
        self.op_types = sorted({op.op_type for op, _, _ in self._steps})

    def reset(self) -> None:
        for value in self.states.values():
            value.fill(0)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, var in self._inputs.items():
            var._sym_val = _Value(np.asarray(inputs[name], dtype=_np_dtype(var)))
        for op, impl, outs in self._steps:
            result = impl(op)
            if len(outs) == 1:
                result = (result,)
            for (var, dtype), value in zip(outs, result):
                var._sym_val = _Value(np.asarray(value, dtype=dtype) if dtype is not None else value)
        return {var.name: var.val for var in self._outputs}

    # ---- per-op implementations -------------------------------------------------------------------

    @staticmethod
    def _infer(op: Any) -> Any:
        try:
            value = op.value_inference()
        except NotImplementedError:
            value = None
        if value is None:
            raise NotImplementedError(f"MIL op {op.op_type!r} ({op.name}) has no value inference in coremltools "
                                      f"and no implementation here")
        return value

    def _read_state(self, op: Any) -> np.ndarray:
        return self.states[op.input.name]

    def _update_state(self, op: Any) -> np.ndarray:
        value = op.value.val
        self.states[op.state.name] = value
        return value

    @staticmethod
    def _shape(op: Any) -> np.ndarray:
        return np.array(op.x.val.shape, dtype=np.int32)

    @staticmethod
    def _reshape(op: Any) -> np.ndarray:
        x, shape = op.x.val, op.shape.val
        # MIL: 0 copies the input's dimension at that index, -1 is inferred
        return x.reshape([x.shape[i] if d == 0 else int(d) for i, d in enumerate(shape)])

    @staticmethod
    def _reduce(op: Any) -> np.ndarray:
        axes = None if op.axes is None else tuple(int(a) for a in np.atleast_1d(op.axes.val))
        keep = bool(op.keep_dims.val) if op.keep_dims is not None else False
        return _REDUCTIONS[op.op_type](op.x.val, axis=axes, keepdims=keep)

    @staticmethod
    def _silu(op: Any) -> np.ndarray:
        x = op.x.val
        with np.errstate(over="ignore"):  # exp(-x) -> inf for very negative x gives x / inf = -0, as it should
            return x / (1 + np.exp(-x))

    def _sums_fp16(self, *operands: np.ndarray) -> bool:
        return self.accumulation is Accumulation.FP16_SEQUENTIAL and all(v.dtype == np.float16 for v in operands)

    def _linear(self, op: Any) -> np.ndarray:
        x = op.x.val
        if self._sums_fp16(x, op.weight.val):
            weight_t = self._weights16_t.get(op.weight.name)
            out = sequential_fp16_linear(x, op.weight.val.T if weight_t is None else weight_t)
            return out if op.bias is None else out + op.bias.val.astype(np.float16)
        weight = self._weights32.get(op.weight.name)
        if weight is None:
            weight = op.weight.val.astype(np.float32)
        out = np.matmul(x.astype(np.float32), weight.T)  # (..., out) fp32 accumulation
        if op.bias is not None:
            out += op.bias.val
        return out

    def _matmul(self, op: Any) -> np.ndarray:
        x, y = op.x.val, op.y.val
        if op.transpose_x.val:
            x = np.swapaxes(x, -1, -2)
        if op.transpose_y.val:
            y = np.swapaxes(y, -1, -2)
        if self._sums_fp16(x, y):
            return sequential_fp16_matmul(x, y)
        return np.matmul(x.astype(np.float32), y.astype(np.float32))
