"""A detector graph that takes its photos as uint8 pixels and normalises them itself.

SCRFD takes float32 NCHW input, ``(x - 127.5) / 128`` of RGB pixels. Built on the CPU, a
640x640 photo is 4.9 MB of floats: converting it cost a GPU worker most of its detection time
on the H100 (docs/SCALING.md, "Forty-eighth session": 5.9 ms of a worker per photo at 640x640,
of which building the float input took ~3.6 ms on one core, and the input is copied to the GPU
in full). :func:`uint8_input` puts that step in front of the graph instead: the new input is the
letterboxed BGR canvases as they are, ``(N, H, W, 3)`` uint8 (1.2 MB a photo), and the graph
casts, swaps BGR to RGB, transposes to NCHW and normalises, on the device that runs the model.

The arithmetic is the float path's own (a cast, a float32 subtraction, a float32
multiplication), so on the CPU provider the outputs are those of the float input
(tests/test_models.py). Nothing else in the graph changes: the weights, and so the model's name
and sha256 recorded with every face, are the file's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: Suffix of the uint8 input's name (the graph's own float input keeps its name inside).
INPUT_SUFFIX = "_bgr_uint8"


def uint8_input(model: str | Path | Any, mean: float, std: float) -> bytes:
    """The serialised ONNX ``model`` (a path or a loaded ``onnx.ModelProto``, which is not
    changed) whose first input, float32 NCHW RGB ``(x - mean) / std``, is replaced by
    ``<name>_bgr_uint8``: uint8 NHWC BGR pixels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if isinstance(model, (str, Path)):
        m = onnx.load(str(model))
    else:
        m = onnx.ModelProto()
        m.CopyFrom(model)  # the caller's model stays as it was
    g = m.graph
    initializers = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in initializers]
    if not inputs:
        raise ValueError("the model has no graph input to replace")
    src = inputs[0]
    if src.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError(f"input {src.name!r} is not float32")
    dims = list(src.type.tensor_type.shape.dim)
    if len(dims) != 4:
        raise ValueError(f"input {src.name!r} is not NCHW")

    def dim(d: Any) -> int | str | None:
        if d.HasField("dim_value"):
            return int(d.dim_value)
        return d.dim_param or None

    name = src.name + INPUT_SUFFIX
    new_input = helper.make_tensor_value_info(
        name, TensorProto.UINT8, [dim(dims[0]), dim(dims[2]), dim(dims[3]), 3]
    )
    p = src.name + "/uint8_input/"

    def const(tag: str, value: np.ndarray) -> Any:
        return helper.make_node(
            "Constant", [], [p + tag], value=numpy_helper.from_array(value, p + tag + "_value")
        )

    nodes = [
        const("rgb", np.array([2, 1, 0], np.int64)),
        const("mean", np.array(mean, np.float32)),
        const("scale", np.array(1.0 / std, np.float32)),
        helper.make_node("Cast", [name], [p + "float"], to=TensorProto.FLOAT),
        helper.make_node("Gather", [p + "float", p + "rgb"], [p + "nhwc_rgb"], axis=3),
        helper.make_node("Transpose", [p + "nhwc_rgb"], [p + "nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Sub", [p + "nchw", p + "mean"], [p + "centred"]),
        helper.make_node("Mul", [p + "centred", p + "scale"], [src.name]),
    ]
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old)
    keep = [i for i in g.input if i.name != src.name]
    del g.input[:]
    g.input.extend([new_input, *keep])
    onnx.checker.check_model(m)
    return m.SerializeToString()
