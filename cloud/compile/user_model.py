"""Validation of user-supplied ONNX models (scikit-learn, PyTorch, ... exports).

A model is accepted only if it loads in onnxruntime, takes exactly one ``[N, F]`` float32 or
float64 tensor with ``F`` = the feature list's length and a dynamic batch axis, has an output
that can be read as the declared kind, and gives finite (and, for classifiers, in-range)
outputs on a test batch. The accepted model is *adapted*: wrapped so it follows the same I/O
contract as compiled river models (``features`` double in; ``label``/``probability``/
``probabilities`` or ``value`` out; see ``cloud.compile.model``). The adapted bytes are what
ships to the edge, so the gateway speaks one contract whatever produced the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, compose, helper, numpy_helper

from cloud.compile.errors import UserModelError
from cloud.compile.model import (
    CLASSIFIER_OUTPUTS,
    INPUT_NAME,
    REGRESSOR_OUTPUTS,
    CompiledModel,
    Kind,
    ValidationReport,
)
from cloud.compile.runtime import frames_to_matrix, new_session

__all__ = ["validate_user_model"]

_FLOATS: dict[int, str] = {int(TensorProto.FLOAT): "float32", int(TensorProto.DOUBLE): "float64"}
_PREFIX = "user/"
_CLASS_ATTRS = ("classlabels_int64s", "classlabels_ints", "classlabels_strings")


def _dtype_name(elem_type: int) -> str:
    return str(helper.tensor_dtype_to_np_dtype(elem_type)) if elem_type else "undefined"


def _parse(onnx_bytes: bytes) -> onnx.ModelProto:
    if not isinstance(onnx_bytes, bytes | bytearray) or not onnx_bytes:
        raise UserModelError("not an ONNX model: the file is empty")
    try:
        model = onnx.load_model_from_string(bytes(onnx_bytes))
    except (DecodeError, ValueError) as e:
        raise UserModelError(
            f"not an ONNX model: cannot parse {len(onnx_bytes)} bytes as ONNX protobuf ({e})"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise UserModelError(
            f"not an ONNX model: {len(onnx_bytes)} bytes parse to an empty graph (truncated or "
            "not an ONNX file)"
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise UserModelError(f"invalid ONNX model (truncated or corrupt?): {first}") from None
    try:
        new_session(model.SerializeToString())
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own hierarchy
        raise UserModelError(f"onnxruntime cannot load the model: {e}") from None
    return model


def _single_input(model: onnx.ModelProto, features: Sequence[str]) -> tuple[str, int]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise UserModelError(
            f"the model has {len(inputs)} inputs ({names}); edgeloop feeds exactly one "
            f"[N, {len(features)}] tensor with the features {list(features)} as columns"
        )
    inp = inputs[0]
    if not inp.type.HasField("tensor_type"):
        raise UserModelError(f"input {inp.name!r} is not a tensor; expected [N, {len(features)}]")
    elem = inp.type.tensor_type.elem_type
    if elem not in _FLOATS:
        raise UserModelError(
            f"input {inp.name!r} has dtype {_dtype_name(elem)}; expected float32 or float64"
        )
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != 2:
        raise UserModelError(
            f"input {inp.name!r} has rank {len(dims)}; expected [N, {len(features)}] (rank 2)"
        )
    if dims[1].HasField("dim_value") and dims[1].dim_value != len(features):
        raise UserModelError(
            f"input {inp.name!r} has width {dims[1].dim_value}, but the feature list has "
            f"{len(features)} features {list(features)}"
        )
    if dims[0].HasField("dim_value"):
        raise UserModelError(
            f"input {inp.name!r} has a fixed batch size of {dims[0].dim_value}; edgeloop scores "
            "batches, so export with a dynamic batch axis (e.g. torch.onnx.export(..., "
            "dynamic_axes={...: {0: 'N'}}) or skl2onnx FloatTensorType([None, F]))"
        )
    return inp.name, elem


def _producer(model: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    for node in model.graph.node:
        if name in node.output:
            found: onnx.NodeProto = node
            return found
    return None


def _class_labels(model: onnx.ModelProto) -> tuple[Any, ...]:
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name in _CLASS_ATTRS:
                values = helper.get_attribute_value(attr)
                return tuple(v.decode() if isinstance(v, bytes) else int(v) for v in values)
    return ()


def _pick_output(model: onnx.ModelProto, kind: Kind, output: str | None) -> tuple[str, bool]:
    """The tensor carrying probabilities/values; True if it came from behind a ZipMap."""
    candidates: list[tuple[str, bool]] = []
    described = []
    for out in model.graph.output:
        t = out.type
        if t.HasField("sequence_type"):
            node = _producer(model, out.name)
            described.append(f"{out.name!r} (sequence)")
            if node is not None and node.op_type == "ZipMap" and kind == "classifier":
                candidates.append((node.input[0], True))
                if output == out.name:
                    return node.input[0], True
            continue
        elem = t.tensor_type.elem_type
        rank = len(t.tensor_type.shape.dim)
        described.append(f"{out.name!r} ({_dtype_name(elem)}, rank {rank})")
        if output is not None and out.name == output:
            if elem not in _FLOATS:
                raise UserModelError(
                    f"output {output!r} has dtype {_dtype_name(elem)}; expected float"
                )
            return out.name, False
        if elem in _FLOATS and rank in (1, 2):
            candidates.append((out.name, False))
    if output is not None:
        raise UserModelError(f"the model has no output {output!r}; outputs: {', '.join(described)}")
    if not candidates:
        want = "class probabilities" if kind == "classifier" else "values"
        raise UserModelError(
            f"no output can be read as {want} (a float tensor [N] or [N, C]); outputs: "
            f"{', '.join(described) or 'none'}"
        )
    if len(candidates) > 1:
        raise UserModelError(
            f"several outputs could carry the {kind}'s result "
            f"({', '.join(repr(c[0]) for c in candidates)}); name one with output=..."
        )
    return candidates[0]


def _adapt(
    model: onnx.ModelProto, user_input: str, elem: int, result: str, zipmap: bool, kind: Kind
) -> tuple[onnx.ModelProto, list[tuple[str, int, list[Any]]]]:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 9:
        raise UserModelError(f"ai.onnx opset {opset} is too old; export with opset >= 9")
    m = compose.add_prefix(model, _PREFIX)
    g = m.graph
    if zipmap:  # the ZipMap's maps are unusable on the edge; read the tensor behind it
        keep = [n for n in g.node if n.op_type != "ZipMap"]
        del g.node[:]
        g.node.extend(keep)
    del g.input[:]
    del g.output[:]
    g.input.append(helper.make_tensor_value_info(INPUT_NAME, TensorProto.DOUBLE, ["N", None]))
    src = _PREFIX + result
    nodes = [helper.make_node("Cast", [INPUT_NAME], [_PREFIX + user_input], to=elem)]

    def const(name: str, value: Any, dtype: Any = np.float64) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    nodes.append(helper.make_node("Cast", [src], ["edgeloop/result"], to=TensorProto.DOUBLE))
    flat = const("edgeloop/shape_n", [-1], np.int64)
    if kind == "regressor":
        nodes.append(helper.make_node("Reshape", ["edgeloop/result", flat], ["value"]))
        outputs = [("value", int(TensorProto.DOUBLE), ["N"])]
    else:
        # probabilities as [N, C] (a rank-1 output becomes one column); the label/probability
        # outputs are added by _finish_classifier once a test run has shown the width
        shape_nc = const("edgeloop/shape_nc", [0, -1], np.int64)
        nodes.append(
            helper.make_node("Reshape", ["edgeloop/result", shape_nc], ["edgeloop/probas_in"])
        )
        outputs = [("edgeloop/probas_in", int(TensorProto.DOUBLE), ["N", "C"])]
    g.node.extend(nodes)
    for name, t, shape in outputs:
        g.output.append(helper.make_tensor_value_info(name, t, shape))
    return m, outputs


def _finish_classifier(m: onnx.ModelProto, width: int, opset: int) -> None:
    """Add label/probability/probabilities to an adapted classifier whose width is known."""
    g = m.graph
    del g.output[:]
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: Any, dtype: Any = np.float64) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    flat = "edgeloop/shape_n"
    if width == 1:  # a single column is P(positive class)
        nodes += [
            helper.make_node(
                "Reshape",
                ["edgeloop/probas_in", const("edgeloop/shape_n1", [-1, 1], np.int64)],
                ["edgeloop/p1"],
            ),
            helper.make_node(
                "Sub", [const("edgeloop/one", [[1.0]]), "edgeloop/p1"], ["edgeloop/p0"]
            ),
            helper.make_node("Concat", ["edgeloop/p0", "edgeloop/p1"], ["edgeloop/probas"], axis=1),
        ]
        width = 2
    else:
        nodes.append(helper.make_node("Identity", ["edgeloop/probas_in"], ["edgeloop/probas"]))
    nodes.append(helper.make_node("ArgMax", ["edgeloop/probas"], ["label"], axis=1, keepdims=0))
    if width == 2:
        pick = const("edgeloop/pick_positive", [[0.0], [1.0]])
        nodes.append(helper.make_node("MatMul", ["edgeloop/probas", pick], ["edgeloop/p_col"]))
    elif opset >= 18:
        axes = const("edgeloop/axes1", [1], np.int64)
        nodes.append(
            helper.make_node("ReduceMax", ["edgeloop/probas", axes], ["edgeloop/p_col"], keepdims=1)
        )
    else:
        nodes.append(
            helper.make_node(
                "ReduceMax", ["edgeloop/probas"], ["edgeloop/p_col"], axes=[1], keepdims=1
            )
        )
    nodes += [
        helper.make_node("Reshape", ["edgeloop/p_col", flat], ["probability"]),
        helper.make_node("Identity", ["edgeloop/probas"], ["probabilities"]),
    ]
    g.node.extend(nodes)
    g.output.extend(
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("probability", TensorProto.DOUBLE, ["N"]),
            helper.make_tensor_value_info("probabilities", TensorProto.DOUBLE, ["N", width]),
        ]
    )


def _check_finite(name: str, values: np.ndarray, rows: int) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        n_bad = int(bad.reshape(len(values), -1).any(axis=1).sum())
        what = "NaN" if np.isnan(values).any() else "infinite values"
        raise UserModelError(f"model output {name!r} is {what} for {n_bad} of {rows} test rows")


def validate_user_model(
    onnx_bytes: bytes,
    features: Sequence[str],
    kind: Kind,
    *,
    name: str = "user-model",
    output: str | None = None,
    sample: Sequence[Mapping[str, float | None]] | None = None,
    test_rows: int = 64,
    latency_calls: int = 200,
    seed: int = 0,
) -> ValidationReport:
    """Validate a user's ONNX model against its feature list and adapt it to the contract.

    ``sample`` frames (e.g. recent live frames) form the test batch when given; otherwise rows
    are drawn from a standard normal distribution. Latency is measured over ``latency_calls``
    single-row calls of the adapted model. Raises ``UserModelError`` with the reason on refusal.
    """
    features = list(features)
    if kind not in ("classifier", "regressor"):
        raise UserModelError(f"kind: expected 'classifier' or 'regressor', got {kind!r}")
    if not features or len(set(features)) != len(features):
        raise UserModelError(f"features: expected a non-empty list of unique names, got {features}")
    model = _parse(onnx_bytes)
    user_input, elem = _single_input(model, features)
    result, zipmap = _pick_output(model, kind, output)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    adapted, _ = _adapt(model, user_input, elem, result, zipmap, kind)

    if sample:
        x = frames_to_matrix(sample, features)
    else:
        x = np.random.default_rng(seed).standard_normal((test_rows, len(features)))
    rows = len(x)
    notes: list[str] = []
    classes: tuple[Any, ...] = ()
    try:
        if kind == "classifier":
            probe = new_session(adapted.SerializeToString())
            (raw,) = probe.run(["edgeloop/probas_in"], {INPUT_NAME: x})
            width = 1 if raw.ndim == 1 else int(raw.shape[1])
            if raw.shape[0] != rows:
                raise UserModelError(
                    f"output {result!r} has {raw.shape[0]} rows for a batch of {rows}"
                )
            _check_finite(result, raw, rows)
            _finish_classifier(adapted, width, opset)
            classes = _class_labels(model)
            n_classes = max(width, 2)
            if len(classes) != n_classes:
                if classes:
                    notes.append(f"class labels {list(classes)} do not match {n_classes} columns")
                classes = tuple(range(n_classes))
        meta = {p.key: p.value for p in adapted.metadata_props}
        meta.update(
            {
                "edgeloop.kind": kind,
                "edgeloop.features": json.dumps(features),
                "edgeloop.source": f"user: {model.producer_name or 'unknown'} {model.producer_version}".strip(),
            }
        )
        if kind == "classifier":
            meta["edgeloop.classes"] = json.dumps(list(classes))
        helper.set_model_props(adapted, meta)
        blob = adapted.SerializeToString()
        sess = new_session(blob)
        outs = dict(
            zip(
                [o.name for o in sess.get_outputs()],
                sess.run(None, {INPUT_NAME: x}),
                strict=True,
            )
        )
    except UserModelError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime errors carry the useful text
        raise UserModelError(f"the model fails on a test batch of {rows} rows: {e}") from None

    expected = CLASSIFIER_OUTPUTS if kind == "classifier" else REGRESSOR_OUTPUTS
    for out_name in expected:
        got = outs[out_name]
        if got.shape[0] != rows:
            per_row = f"{got.shape[0] / rows:g} values per row" if rows else "values"
            raise UserModelError(
                f"output {result!r} gives {per_row} for a batch of {rows} rows; a "
                f"{kind} must give one {'value' if kind == 'regressor' else 'row'} per input "
                "row ([N] or [N, 1])"
            )
        if out_name != "label":
            _check_finite(result, got, rows)
    if kind == "classifier":
        p = outs["probabilities"]
        if p.min() < -1e-6 or p.max() > 1 + 1e-6:
            raise UserModelError(
                f"output {result!r} is not a probability: values range over "
                f"[{p.min():.4g}, {p.max():.4g}] (export probabilities, not raw scores)"
            )
        sums = p.sum(axis=1)
        if np.abs(sums - 1).max() > 1e-3:
            notes.append(f"class probabilities sum to {sums.min():.4g}..{sums.max():.4g}, not 1")

    single = x[:1]
    for _ in range(5):  # warm-up: first calls allocate
        sess.run(None, {INPUT_NAME: single})
    times = []
    for i in range(latency_calls):
        row = x[i % rows : i % rows + 1]
        t0 = time.perf_counter_ns()
        sess.run(None, {INPUT_NAME: row})
        times.append(time.perf_counter_ns() - t0)
    p50, p99 = np.percentile(np.array(times) / 1e6, [50, 99])

    compiled = CompiledModel(
        onnx=blob,
        name=name,
        kind=kind,
        features=tuple(features),
        classes=classes,
        opset=opset,
        source=meta["edgeloop.source"],
    )
    return ValidationReport(
        model=compiled,
        original_input=user_input,
        original_dtype=_FLOATS[elem],
        original_outputs=tuple(o.name for o in model.graph.output),
        test_rows=rows,
        latency_p50_ms=float(p50),
        latency_p99_ms=float(p99),
        latency_calls=latency_calls,
        notes=tuple(notes),
    )
