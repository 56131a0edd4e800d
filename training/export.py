"""ONNX export: a trained backbone as an insightface-style recognizer, or a base recognizer's
graph with a trained adapter appended. Either loads through insightface's ``ArcFaceONNX``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from faceloop.errors import ConfigError
from faceloop.hashing import sha256_file
from training.infer import ONNX_INPUT, ONNX_OUTPUT
from training.model import ResidualAdapter


def export_onnx(model: nn.Module, path: str | Path, opset: int = 17) -> str:
    """Write ``model`` (eval mode, on CPU) as one self-contained ONNX file with a dynamic
    batch axis and return its sha256. The model is left on the CPU in eval mode."""
    model = model.cpu().eval()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    # The TorchScript exporter (dynamo=False) needs no onnxscript and writes one file.
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 112, 112),),
        str(tmp),
        input_names=[ONNX_INPUT],
        output_names=[ONNX_OUTPUT],
        dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )
    tmp.replace(path)
    return sha256_file(path)


def export_on_top(base_onnx: str | Path, adapter: ResidualAdapter, path: str | Path) -> str:
    """The base recognizer's graph with the adapter appended (MatMul, Add, residual Add) as one
    ONNX file; input and preprocessing unchanged, so insightface loads it like the base.
    Returns its sha256."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(base_onnx))
    graph = model.graph
    if len(graph.output) != 1:
        raise ConfigError(f"{base_onnx}: expected one output, found {len(graph.output)}")
    out = graph.output[0]
    # Names unused in the graph: a model trained on top of an adapted model gets a second adapter.
    names = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    prefix = next(
        f"faceloop_adapter{k or ''}"
        for k in range(len(names) + 1)
        if not any(n.startswith(f"faceloop_adapter{k or ''}.") for n in names)
    )
    raw = out.name
    if raw == ONNX_OUTPUT:  # the base is one of ours: its output becomes an inner tensor
        raw = f"{prefix}.in"
        for node in graph.node:
            node.output[:] = [raw if o == ONNX_OUTPUT else o for o in node.output]
            node.input[:] = [raw if i == ONNX_OUTPUT else i for i in node.input]
    w = adapter.fc.weight.detach().cpu().numpy().T.astype(np.float32)  # x @ W^T
    b = adapter.fc.bias.detach().cpu().numpy().astype(np.float32)
    graph.initializer.extend(
        [
            numpy_helper.from_array(w, f"{prefix}.weight"),
            numpy_helper.from_array(b, f"{prefix}.bias"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node(
                "MatMul", [raw, f"{prefix}.weight"], [f"{prefix}.mm"], name=f"{prefix}/MatMul"
            ),
            helper.make_node(
                "Add",
                [f"{prefix}.mm", f"{prefix}.bias"],
                [f"{prefix}.delta"],
                name=f"{prefix}/Bias",
            ),
            helper.make_node(
                "Add", [raw, f"{prefix}.delta"], [ONNX_OUTPUT], name=f"{prefix}/Residual"
            ),
        ]
    )
    new_out = onnx.ValueInfoProto()
    new_out.CopyFrom(out)
    new_out.name = ONNX_OUTPUT
    graph.output.remove(out)
    graph.output.append(new_out)
    onnx.checker.check_model(model)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return sha256_file(path)
