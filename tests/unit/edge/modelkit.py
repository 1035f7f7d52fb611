"""Test helper: a scikit-learn model exported with skl2onnx, with its manifest on disk."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from shared.manifest import ModelManifest, sha256_hex

FEATURES = ("spindle_temp_mean", "vibration_rms_max", "power_mean")


def train(seed: int = 0):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, len(FEATURES))) * [5.0, 1.0, 2.0] + [50.0, 3.0, 10.0]
    y = ((x[:, 0] - 50) / 5 + (x[:, 1] - 3) > 0.5).astype(int)
    return LogisticRegression().fit(x, y), x


def export(
    dirpath: Path,
    *,
    version: int = 1,
    features=FEATURES,
    name: str = "quality",
    n_inputs: int | None = None,
    seed: int = 0,
):
    """Write <name>.onnx and <name>.manifest.json; return (model path, manifest path, sklearn)."""
    from skl2onnx import to_onnx

    model, x = train(seed)
    onnx_model = to_onnx(
        model, x[:1].astype(np.float32), options={id(model): {"zipmap": False}}, target_opset=17
    )
    blob = onnx_model.SerializeToString()
    path = dirpath / f"{name}.onnx"
    path.write_bytes(blob)
    feats = list(features) if n_inputs is None else [f"f{i}_mean" for i in range(n_inputs)]
    manifest = ModelManifest(
        name=name,
        version=version,
        features=tuple(feats),
        output="label",
        sha256=sha256_hex(blob),
        created=time.time_ns(),
    )
    mpath = dirpath / f"{name}.manifest.json"
    mpath.write_bytes(manifest.to_json())
    return path, mpath, model


def export_lookup(dirpath: Path, *, version: int = 1, table_size: int = 4, name: str = "lookup"):
    """A real ONNX model that loads, passes the zero probe, and fails at run time for some inputs.

    prediction = table[int(x[:, 0])] (a Gather): any row whose first feature is outside
    ``[-table_size, table_size)`` makes onnxruntime raise for the whole call. Features
    ``("t_mean", "u_mean")``; returns (model path, manifest path).
    """
    import onnx
    from onnx import TensorProto, helper

    table = helper.make_tensor(
        "table", TensorProto.FLOAT, [table_size], [float(i) / 10 for i in range(table_size)]
    )
    starts = helper.make_tensor("starts", TensorProto.INT64, [1], [0])
    ends = helper.make_tensor("ends", TensorProto.INT64, [1], [1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["col"]),
        helper.make_node("Cast", ["col"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "idx"], ["label"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "lookup",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("label", TensorProto.FLOAT, ["batch", 1])],
        initializer=[table, starts, ends, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    blob = model.SerializeToString()
    path = dirpath / f"{name}-v{version}.onnx"
    path.write_bytes(blob)
    manifest = ModelManifest(
        name=name,
        version=version,
        features=("t_mean", "u_mean"),
        output="label",
        sha256=sha256_hex(blob),
        created=time.time_ns(),
        kind="regressor",
    )
    mpath = dirpath / f"{name}-v{version}.manifest.json"
    mpath.write_bytes(manifest.to_json())
    return path, mpath
