"""The promotion gate: the compiled model must equal river's own prediction on recent frames."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cloud.compile.model import CompiledModel, ParityReport
from cloud.compile.runtime import frames_to_matrix, new_session, present_features

__all__ = ["DEFAULT_ATOL", "check_parity", "river_predictions"]

DEFAULT_ATOL = 1e-5


def river_predictions(
    model: Any, compiled: CompiledModel, frames: Sequence[Mapping[str, float | None]]
) -> tuple[np.ndarray, list[str]]:
    """River's outputs on ``frames`` in the compiled model's layout: ``[N, C]`` probabilities
    (columns = ``compiled.classes``) or ``[N]`` values. Also returns problems found (e.g. a
    class river predicts that the compiled model does not know)."""
    problems: list[str] = []
    feats = list(compiled.features)
    if compiled.kind == "classifier":
        col = {c: i for i, c in enumerate(compiled.classes)}
        out = np.zeros((len(frames), len(col)))
        for i, frame in enumerate(frames):
            for c, p in model.predict_proba_one(present_features(frame, feats)).items():
                if c in col:
                    out[i, col[c]] = p
                elif p != 0 and len(problems) < 5:
                    problems.append(
                        f"row {i}: river gives class {c!r} probability {p:.6g}, but the compiled "
                        f"model only knows {list(compiled.classes)} (recompile)"
                    )
        return out, problems
    values = np.array(
        [float(model.predict_one(present_features(f, feats))) for f in frames], dtype=np.float64
    )
    return values, problems


def check_parity(
    model: Any,
    compiled: CompiledModel,
    frames: Sequence[Mapping[str, float | None]],
    atol: float = DEFAULT_ATOL,
) -> ParityReport:
    """Run river and the ONNX artifact on the same frames and compare.

    Classifiers are compared on every class probability, regressors on the value. Frames are
    read through the compiled feature list (extra keys are ignored by both; absent, None and
    NaN values are missing for both). A NaN on one side only counts as an infinite difference.
    ``passed`` requires at least one frame, every difference <= ``atol`` and no unknown class.
    The model is only read (river's predict methods do not learn).
    """
    if not frames:
        return ParityReport(0, math.inf, atol, False, reason="no frames to compare on")
    expected, problems = river_predictions(model, compiled, frames)
    sess = new_session(compiled.onnx)
    x = frames_to_matrix(frames, compiled.features)
    if compiled.kind == "classifier":
        label, got = sess.run(["label", "probabilities"], {compiled.input_name: x})
    else:
        (got,) = sess.run(["value"], {compiled.input_name: x})
    both_nan = np.isnan(expected) & np.isnan(got)
    diff = np.where(both_nan, 0.0, np.abs(expected - got))
    diff = np.where(np.isnan(diff), np.inf, diff)
    per_row = diff.max(axis=1) if diff.ndim == 2 else diff
    worst = int(np.argmax(per_row))
    max_diff = float(per_row[worst])
    mismatches = 0
    if compiled.kind == "classifier":
        mismatches = int(np.sum(np.argmax(expected, axis=1) != label))
    passed = max_diff <= atol and not problems
    reason = ""
    if problems:
        reason = "; ".join(problems)
    elif not passed:
        reason = (
            f"max |river - onnx| = {max_diff:.3g} > atol {atol:g} at row {worst} "
            f"(river {expected[worst]!r}, onnx {got[worst]!r})"
        )
    return ParityReport(
        n=len(frames),
        max_abs_diff=max_diff,
        atol=atol,
        passed=passed,
        label_mismatches=mismatches,
        worst_row=worst,
        reason=reason,
    )
