"""On-device inference: an ONNX model in a slot that can be swapped atomically.

:func:`load_model` reads the manifest (feature names in input order, output name, sha256),
checks the artifact's sha256 against it, opens an onnxruntime session with ``intra_op_threads``
(1 by default: a gateway has few cores and the agent has other work), checks that the model
takes exactly one ``[batch, len(features)]`` float tensor, and runs a probe batch. Anything wrong
raises :class:`ModelLoadError` with the file and what was expected.

:class:`ModelSlot` holds the active model and the one it replaced. ``swap`` replaces the active
model in one reference assignment on the event loop, so a tick scores a whole batch with either
the old or the new model, never a mix; ``rollback`` brings the previous one back at once.
The delivery issue (verify signature, shadow test) builds on ``load_model`` + ``swap``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge.frames import PendingFrame
from shared.manifest import ManifestError, ModelManifest
from shared.records import Frame, trusted_frame

__all__ = ["LoadedModel", "ModelLoadError", "ModelSlot", "load_model", "unscored"]

log = logging.getLogger(__name__)

_FLOAT_TYPES: dict[str, type[np.floating[Any]]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
}


class ModelLoadError(Exception):
    """A model or its manifest cannot be used; the message names the file and the expectation."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    manifest: ModelManifest
    path: Path
    session: ort.InferenceSession
    input_name: str
    dtype: type[np.floating[Any]]
    label_output: str
    score_output: str | None

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def features(self) -> tuple[str, ...]:
        return self.manifest.features

    def predict(self, x: np.ndarray[Any, Any]) -> tuple[list[float], list[float | None]]:
        """Score a ``[n, features]`` matrix in one call: (prediction, score) per row."""
        names = [self.label_output] + ([self.score_output] if self.score_output else [])
        outs = self.session.run(names, {self.input_name: x.astype(self.dtype, copy=False)})
        labels = np.asarray(outs[0]).reshape(len(x), -1)[:, 0]
        preds: list[float] = labels.astype(np.float64).tolist()
        scores: list[float | None] = [None] * len(x)
        if self.score_output:
            out = outs[1]
            if (
                isinstance(out, np.ndarray)
                and out.ndim == 2
                and out.shape[0] == len(x)
                and out.shape[1] > 0
            ):
                # the usual probability matrix: one vectorised step, not one array per row
                col = out[:, 1] if out.shape[1] == 2 else out.max(axis=1)
                scores = col.astype(np.float64).tolist()
            else:
                scores = [_score(row) for row in _rows(out, len(x))]
        return preds, scores


def _rows(out: Any, n: int) -> list[Any]:
    if isinstance(out, list):
        return out
    arr = np.asarray(out)
    return list(arr.reshape(n, -1))


def _score(row: Any) -> float | None:
    """Probability of the positive class (class 1 of two), else the top class probability."""
    if isinstance(row, dict):
        if len(row) == 2 and 1 in row:
            return float(row[1])
        return float(max(row.values())) if row else None
    arr = np.asarray(row, dtype=np.float64).ravel()
    if arr.size == 2:
        return float(arr[1])
    return float(arr.max()) if arr.size else None


def load_model(path: Path, manifest_path: Path, *, intra_op_threads: int = 1) -> LoadedModel:
    """Load and check a model; raise :class:`ModelLoadError` saying what is wrong."""
    try:
        manifest = ModelManifest.from_json(manifest_path.read_bytes())
    except OSError as exc:
        raise ModelLoadError(
            f"model manifest {manifest_path}: cannot read ({exc.strerror})"
        ) from exc
    except ManifestError as exc:
        raise ModelLoadError(f"model manifest {manifest_path}: {exc}") from exc
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"model {path}: cannot read ({exc.strerror})") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != manifest.sha256:
        raise ModelLoadError(
            f"model {path}: sha256 {digest[:12]}... does not match the manifest's "
            f"{manifest.sha256[:12]}... (corrupt or wrong file)"
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"model {path}: onnxruntime cannot load it: {exc}") from exc
    inputs = session.get_inputs()
    n = len(manifest.features)
    if len(inputs) != 1:
        raise ModelLoadError(
            f"model {path}: expected exactly one input tensor [batch, {n}], "
            f"it has {len(inputs)}: {[i.name for i in inputs]}"
        )
    inp = inputs[0]
    shape = list(inp.shape)
    if inp.type not in _FLOAT_TYPES:
        raise ModelLoadError(
            f"model {path}: input {inp.name!r} is {inp.type}; expected tensor(float) or "
            "tensor(double)"
        )
    if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != n):
        raise ModelLoadError(
            f"model {path}: input {inp.name!r} has shape {shape}; the manifest lists {n} "
            f"features {list(manifest.features)}, so expected [batch, {n}]"
        )
    outputs = [o.name for o in session.get_outputs()]
    label = manifest.output if manifest.output in outputs else outputs[0]
    score = next(
        (o.name for o in session.get_outputs() if o.name != label and "prob" in o.name.lower()),
        None,
    )
    model = LoadedModel(manifest, path, session, inp.name, _FLOAT_TYPES[inp.type], label, score)
    try:
        model.predict(np.zeros((2, n), dtype=np.float64))
    except Exception as exc:
        raise ModelLoadError(
            f"model {path}: a probe batch of shape [2, {n}] failed: {exc}"
        ) from exc
    return model


class ModelSlot:
    """The active model, the previous one (for rollback), and batched scoring."""

    def __init__(
        self,
        observe_latency: Callable[[float], None] | None = None,
        on_score_error: Callable[[int], None] | None = None,
    ) -> None:
        self.current: LoadedModel | None = None
        self.previous: LoadedModel | None = None
        self.error: str | None = None  # why the slot is empty or degraded
        self._observe = observe_latency
        self._on_score_error = on_score_error
        self.unscored = 0  # frames that lacked a feature the model needs
        self.score_errors = 0  # model calls that raised (or returned the wrong row count)
        self.score_failed_frames = 0  # frames those calls left unscored
        self.last_score_error: str | None = None
        self.last_score_error_at: float | None = None  # time.monotonic()

    def swap(self, model: LoadedModel) -> LoadedModel | None:
        """Make ``model`` active; keep the replaced one for :meth:`rollback`. Returns it."""
        old = self.current
        self.previous, self.current = old, model
        self.error = None
        self._clear_score_error()
        return old

    def _clear_score_error(self) -> None:
        self.last_score_error = None
        self.last_score_error_at = None

    def rollback(self) -> LoadedModel:
        """Reactivate the previous model (the current one becomes previous)."""
        if self.previous is None:
            raise RuntimeError("no previous model to roll back to")
        self.current, self.previous = self.previous, self.current
        self._clear_score_error()
        return self.current

    def fail(self, reason: str) -> None:
        """Record why a model could not be loaded (the agent reports itself degraded)."""
        self.error = reason

    def _score_failed(self, model: LoadedModel, n: int, exc: Exception) -> None:
        self.score_errors += 1
        self.score_failed_frames += n
        self.last_score_error = (
            f"model {model.manifest.name} v{model.version} failed scoring {n} frames: "
            f"{type(exc).__name__}: {exc}"
        )[:500]
        self.last_score_error_at = time.monotonic()
        if self.score_errors == 1 or self.score_errors % 1000 == 0:
            log.error("%s (%d failed calls so far)", self.last_score_error, self.score_errors)
        if self._on_score_error is not None:
            self._on_score_error(n)

    @property
    def versions(self) -> dict[str, int]:
        m = self.current
        return {} if m is None else {m.manifest.name: m.version}

    def score(self, pending: Sequence[PendingFrame]) -> list[Frame]:
        """Turn pending frames into records, scoring all scorable ones in ONE model call."""
        model = self.current
        if model is None or not pending:
            return unscored(pending)
        names = model.features
        rows: list[int]
        try:  # the usual case: every frame has every input; one conversion for the batch
            x = np.array([[p.features[n] for n in names] for p in pending], dtype=np.float64)
            rows = list(range(len(pending)))
        except KeyError:
            rows = []
            x = np.empty((len(pending), len(names)), dtype=np.float64)
            for i, p in enumerate(pending):
                try:
                    x[len(rows)] = [p.features[n] for n in names]
                except KeyError:
                    self.unscored += 1
                    continue
                rows.append(i)
        preds: list[float] = []
        scores: list[float | None] = []
        if rows:
            t0 = time.perf_counter()
            try:
                preds, scores = model.predict(x[: len(rows)])
                if len(preds) != len(rows) or len(scores) != len(rows):
                    raise ValueError(f"{len(preds)} outputs for {len(rows)} input rows")
            except Exception as exc:  # noqa: BLE001 - a model failing at run time degrades
                self._score_failed(model, len(rows), exc)
                # the model's frames go out unscored, tagged with its version and no
                # prediction: to the watch after a swap that is the same as NaN (rollback)
                nan = math.nan
                preds, scores = [nan] * len(rows), [None] * len(rows)
            else:
                if self._observe is not None:
                    self._observe(time.perf_counter() - t0)
        out: list[Frame] = []
        k = 0
        for i, p in enumerate(pending):
            if k < len(rows) and rows[k] == i:
                pred, score = preds[k], scores[k]
                k += 1
                out.append(
                    _frame(
                        p,
                        None if math.isnan(pred) else pred,
                        model.version,
                        None if score is None or math.isnan(score) else score,
                    )
                )
            else:
                out.append(_frame(p, None, None, None))
        return out


def unscored(pending: Sequence[PendingFrame]) -> list[Frame]:
    """The frames as records without a prediction (no model, or the scoring stage failed)."""
    return [_frame(p, None, None, None) for p in pending]


def _frame(
    p: PendingFrame, prediction: float | None, version: int | None, score: float | None
) -> Frame:
    """A :class:`Frame` from a pending frame, without re-running the record's field checks.

    Every field is valid by construction: asset, key and ts come from the frame builder's config
    and clock, the features are its float aggregates, the prediction and score floats from the
    model (NaN already mapped to None), the version an int. Checking again cost 60 % of a
    10-frame ``score`` call; the result is an ordinary ``Frame`` (tests compare it with a checked
    one).
    """
    return trusted_frame(
        p.asset, p.key, p.ts_ns, p.features, prediction, version, score, tuple(p.marks)
    )
