"""Tiny ONNX models the tests build themselves (no weights downloaded)."""

from __future__ import annotations

from pathlib import Path


def tiny_recognizer(
    path: Path,
    batch_one: bool = False,
    computed: bool = False,
    offset: float = 0.0,
    scale: float = 1.0,
) -> Path:
    """A valid 112x112 'recognizer': (N,3,112,112) -> global average pool -> (N,3). With
    ``batch_one`` its Reshape fixes the batch at 1 although the input declares a batch axis, as
    EdgeFace's exported graph does (a constant target: faceloop.onnx_batch can free it); with
    ``computed`` too, the target [1, 3] is computed by a Concat node at run time (it cannot).
    ``offset`` is added to every output: a large one maps every face to nearly one direction,
    as a recognizer trained too little does; every output is multiplied by ``scale`` (0: a
    model that outputs zeros)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 112, 112])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    if computed:
        parts = [
            helper.make_tensor("one", TensorProto.INT64, [1], [1]),
            helper.make_tensor("three", TensorProto.INT64, [1], [3]),
        ]
        shape_nodes = [helper.make_node("Concat", ["one", "three"], ["shape"], axis=0)]
    else:
        parts = [helper.make_tensor("shape", TensorProto.INT64, [2], [1 if batch_one else -1, 3])]
        shape_nodes = []
    graph = helper.make_graph(
        [
            *shape_nodes,
            helper.make_node("GlobalAveragePool", ["x"], ["p"]),
            helper.make_node("Reshape", ["p", "shape"], ["r" if offset else "s"]),
            *([helper.make_node("Add", ["r", "offset"], ["s"])] if offset else []),
            helper.make_node("Mul", ["s", "scale"], ["y"]),
        ],
        "tiny",
        [x],
        [y],
        [
            *parts,
            helper.make_tensor("scale", TensorProto.FLOAT, [1], [scale]),
            *(
                [helper.make_tensor("offset", TensorProto.FLOAT, [3], [offset] * 3)]
                if offset
                else []
            ),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
