"""What the compiler and the validator hand back: the artifact and the reports about it.

The ONNX I/O contract (the edge depends on it, and reads it from the model's metadata, since
edge code never imports ``cloud``):

* one input, ``features``: ``tensor(double)[N, F]``, columns in the manifest's feature order;
  ``NaN`` means "feature missing from the frame".
* classifiers: ``label`` ``int64[N]`` (index into ``classes``), ``probability`` ``double[N]``
  (probability of the positive class ``classes[-1]`` for two classes, of the predicted label
  otherwise), ``probabilities`` ``double[N, C]`` (columns in ``classes`` order).
* regressors: ``value`` ``double[N]``.
* metadata_props: ``edgeloop.kind``, ``edgeloop.features`` (JSON list), ``edgeloop.classes``
  (JSON list, classifiers), ``edgeloop.source``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CLASSIFIER_OUTPUTS",
    "INPUT_NAME",
    "REGRESSOR_OUTPUTS",
    "CompiledModel",
    "Kind",
    "ParityReport",
    "ValidationReport",
]

Kind = Literal["classifier", "regressor"]

INPUT_NAME = "features"
CLASSIFIER_OUTPUTS = ("label", "probability", "probabilities")
REGRESSOR_OUTPUTS = ("value",)


@dataclass(frozen=True)
class CompiledModel:
    """An ONNX artifact that follows the edgeloop I/O contract (see the module docstring)."""

    onnx: bytes
    name: str
    kind: Kind
    features: tuple[str, ...]
    classes: tuple[Any, ...] = ()  # classifiers: labels in column order (JSON-serialisable)
    opset: int = 0
    source: str = ""  # e.g. "river: StandardScaler | LogisticRegression" or "user: skl2onnx"
    compile_seconds: float = 0.0
    input_name: str = INPUT_NAME
    dtype: str = "float64"

    @property
    def output_names(self) -> tuple[str, ...]:
        return CLASSIFIER_OUTPUTS if self.kind == "classifier" else REGRESSOR_OUTPUTS

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.onnx).hexdigest()

    @property
    def positive_class(self) -> Any:
        """The class whose probability is the ``probability`` output (two-class models)."""
        return self.classes[-1] if len(self.classes) == 2 else None

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for a manifest's ``info`` or an API response."""
        return {
            "name": self.name,
            "kind": self.kind,
            "features": list(self.features),
            "classes": list(self.classes),
            "input": self.input_name,
            "outputs": list(self.output_names),
            "dtype": self.dtype,
            "opset": self.opset,
            "source": self.source,
            "sha256": self.sha256,
            "bytes": len(self.onnx),
        }

    def metadata(self) -> dict[str, str]:
        meta = {
            "edgeloop.kind": self.kind,
            "edgeloop.features": json.dumps(list(self.features)),
            "edgeloop.source": self.source,
        }
        if self.kind == "classifier":
            meta["edgeloop.classes"] = json.dumps(list(self.classes))
        return meta


@dataclass(frozen=True)
class ParityReport:
    """River vs ONNX on the same frames. ``passed`` is the promotion gate."""

    n: int
    max_abs_diff: float
    atol: float
    passed: bool
    label_mismatches: int = 0  # classifiers: rows where the argmax label differs
    worst_row: int | None = None
    reason: str = ""  # why it failed, when it did

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "max_abs_diff": self.max_abs_diff,
            "atol": self.atol,
            "passed": self.passed,
            "label_mismatches": self.label_mismatches,
            "worst_row": self.worst_row,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ValidationReport:
    """A user model that passed validation, adapted to the edgeloop I/O contract."""

    model: CompiledModel  # the adapted artifact: this is what ships, not the original bytes
    original_input: str
    original_dtype: str
    original_outputs: tuple[str, ...]
    test_rows: int
    latency_p50_ms: float  # single-row calls through onnxruntime
    latency_p99_ms: float
    latency_calls: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.describe(),
            "original_input": self.original_input,
            "original_dtype": self.original_dtype,
            "original_outputs": list(self.original_outputs),
            "test_rows": self.test_rows,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p99_ms": self.latency_p99_ms,
            "latency_calls": self.latency_calls,
            "notes": list(self.notes),
        }
