"""onnxruntime sessions and frame -> matrix conversion shared by parity, validation and bench."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

__all__ = ["frames_to_matrix", "new_session", "present_features"]


def new_session(onnx_bytes: bytes, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with a fixed thread count (a gateway has few cores; so do we)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def _missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def frames_to_matrix(
    frames: Sequence[Mapping[str, float | None]], features: Sequence[str]
) -> npt.NDArray[np.float64]:
    """``double[N, F]`` in feature order; absent, None and NaN values become NaN (missing)."""
    out = np.full((len(frames), len(features)), np.nan)
    for i, frame in enumerate(frames):
        for j, f in enumerate(features):
            v = frame.get(f)
            if not _missing(v):
                out[i, j] = float(v)  # type: ignore[arg-type]
    return out


def present_features(
    frame: Mapping[str, float | None], features: Sequence[str]
) -> dict[str, float]:
    """The dict river sees for a frame: listed features that are present, as floats."""
    return {f: float(v) for f in features if not _missing(v := frame.get(f))}  # type: ignore[arg-type]
