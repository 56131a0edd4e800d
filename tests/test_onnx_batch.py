"""faceloop.onnx_batch: a batch axis freed in recognizer graphs that fix it at 1, accepted only
when one call of several crops embeds as one crop per call does."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from faceloop.onnx_batch import batched_session, free_batch_axis
from tests.tiny_models import tiny_recognizer


def _session(data: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def test_a_constant_batch_of_one_is_freed_and_embeds_as_one_crop_per_call(tmp_path):
    data = tiny_recognizer(tmp_path / "fixed.onnx", batch_one=True).read_bytes()
    x = np.random.default_rng(1).uniform(-1, 1, (4, 3, 112, 112)).astype(np.float32)
    fixed = _session(data)
    freed = free_batch_axis(data)
    assert freed is not None
    got = _session(freed).run(None, {"x": x})[0]
    ref = np.concatenate([fixed.run(None, {"x": x[i : i + 1]})[0] for i in range(4)])
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    # Only the Reshape target changed: the same weights and nodes otherwise.
    before, after = onnx.load_from_string(data), onnx.load_from_string(freed)
    assert [n.op_type for n in before.graph.node] == [n.op_type for n in after.graph.node]
    assert batched_session(fixed, data, _session) is not None


def test_nothing_to_free_when_no_reshape_fixes_the_batch(tmp_path):
    free = tiny_recognizer(tmp_path / "free.onnx").read_bytes()
    computed = tiny_recognizer(tmp_path / "c.onnx", batch_one=True, computed=True).read_bytes()
    assert free_batch_axis(free) is None and free_batch_axis(computed) is None
    assert batched_session(_session(computed), computed, _session) is None


def test_a_freed_graph_whose_batched_outputs_differ_is_refused():
    # (N, 4) -> sum over the batch -> Reshape [1, 4]: with the batch freed it still runs, but a
    # call of three rows gives one row (their sum), not three: the probe refuses it.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
            helper.make_node("Reshape", ["s", "shape"], ["y"]),
        ],
        "pooled",
        [x],
        [y],
        [
            helper.make_tensor("axes", TensorProto.INT64, [1], [0]),
            helper.make_tensor("shape", TensorProto.INT64, [2], [1, 4]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    data = model.SerializeToString()
    assert free_batch_axis(data) is not None
    assert batched_session(_session(data), data, _session) is None


def test_a_kept_freed_graph_is_read_back_only_with_the_bytes_it_recorded(tmp_path):
    from faceloop.onnx_batch import graph_key, keep_freed, kept_freed

    data = tiny_recognizer(tmp_path / "fixed.onnx", batch_one=True).read_bytes()
    freed = free_batch_axis(data)
    assert freed is not None
    folder = tmp_path / "kept"
    key = graph_key("ab" * 32, ["CPUExecutionProvider"])
    assert kept_freed(folder, key) is None
    keep_freed(folder, key, freed, {"first_nodes": ["Conv_0"]})
    got = kept_freed(folder, key)
    assert got is not None and got[0] == freed and got[1]["first_nodes"] == ["Conv_0"]
    # The key names everything the probe's verdict depends on.
    assert graph_key("ab" * 32, ["CUDAExecutionProvider"]) != key
    assert graph_key("cd" * 32, ["CPUExecutionProvider"]) != key
    # A graph file that is not the one recorded (cut short, altered) is not used.
    (folder / f"{key}.onnx").write_bytes(freed[:-10])
    assert kept_freed(folder, key) is None
    (folder / f"{key}.json").write_text("not json")
    assert kept_freed(folder, key) is None


def test_a_folder_that_cannot_be_written_keeps_nothing_and_raises_nothing(tmp_path):
    from faceloop.onnx_batch import keep_freed, kept_freed

    blocker = tmp_path / "file"
    blocker.write_text("")
    keep_freed(blocker / "kept", "k", b"graph", {})  # its parent is a file
    assert kept_freed(blocker / "kept", "k") is None
