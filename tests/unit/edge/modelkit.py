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
