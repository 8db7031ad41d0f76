"""Lower the quantize stage's codes into a converted Core ML program as `constexpr_blockwise_shift_scale`.

iOS 18's op computes w = scale * (data - offset) per block, with uint4/uint8 data, an fp16 scale and an offset
that is either integer (exact: symmetric and round-to-nearest asymmetric codes) or fp16 (float offsets: a GGUF's
Q4_1, HQQ). Scale and a float offset take the weight's own float type (the stage's scales are fp16 values, so
an fp16 program holds them exactly: compress.quantized); in an fp16 program the offset is
-offset/scale rounded to fp16, so the weight moves by at most scale * |offset/scale| * 2**-11 (under 1% of one
grid step for 4-bit codes): far below the fp16 arithmetic the program computes in anyway. The manifest records which tensors took which form.
"""

from __future__ import annotations

from typing import Any

from compress.quantized import QuantTensor


def lower_codes(mlmodel: Any, by_const: dict[str, QuantTensor]) -> tuple[Any, dict[str, Any]]:
    """Replace each named weight const with its codes; returns (new model, notes)."""
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.models import utils as model_utils

    notes: dict[str, Any] = {"integer_offsets": [], "float_offsets": []}

    class CodesPass(AbstractGraphPass):
        def apply(self, prog: Any) -> None:
            for func in prog.functions.values():
                with func:
                    for op in list(func.operations):
                        t = by_const.get(op.name)
                        if op.op_type != "const" or t is None:
                            continue
                        dtype = types.np_uint4_dtype if t.bits == 4 else np.uint8
                        # The const's own float type: fp16 in an fp16 program, fp32 (exact offsets) in an fp32 one.
                        dst = np.float32 if op.outputs[0].dtype == types.fp32 else np.float16
                        zero = t.integer_zero_points()
                        if zero is not None:
                            offset = zero.numpy().astype(dtype)
                            notes["integer_offsets"].append(op.name)
                        else:
                            offset = (-t.offset / t.scale).numpy().astype(dst)
                            notes["float_offsets"].append(op.name)
                        new = mb.constexpr_blockwise_shift_scale(
                            data=t.codes.numpy().astype(dtype), scale=t.scale.numpy().astype(dst),
                            offset=offset, before_op=op, name=op.name + "_codes")
                        op.enclosing_block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0],
                                                                        new_var=new, no_check_var_types=True)
                        op.enclosing_block.remove_ops([op])

    # coremltools applies its own optimize passes through this helper; it is the supported way to run a pass
    # over a converted model and get a model back.
    new_model = model_utils._apply_graph_pass(mlmodel, CodesPass(), spec_version=mlmodel.get_spec().specificationVersion)
    notes = {"codes_lowered": len(notes["integer_offsets"]) + len(notes["float_offsets"]),
             "with_integer_offsets": len(notes["integer_offsets"]), "with_float_offsets": len(notes["float_offsets"])}
    return new_model, notes
