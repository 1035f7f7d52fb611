"""river pipeline -> ONNX, reproducing river's prediction arithmetic in float64.

Supported steps (anything else is an ``UnsupportedModelError`` naming the step):

* ``preprocessing.StandardScaler`` (running or windowed statistics, with or without std), any
  number of them, before the final estimator;
* ``linear_model.LinearRegression`` (identity or Poisson mean function) and
  ``linear_model.LogisticRegression`` (sigmoid, clamped at |z| > 30 as ``utils.math.sigmoid``);
* ``tree.HoeffdingTreeClassifier`` with ``leaf_prediction`` 'mc', 'nb' or 'nba' (naive-Bayes
  leaves need the default GaussianSplitter) and ``tree.HoeffdingTreeRegressor`` with 'mean',
  'model' or 'adaptive' (model leaves need a plain LinearRegression, the default);
* ``forest.ARFClassifier`` and ``forest.ARFRegressor`` with the same leaf options.

Missing features: a NaN in the input is a feature absent from the frame. Linear models then
add nothing for it (river's sparse dot product); trees take river's most-travelled branch;
naive-Bayes leaves skip its likelihood term; a scaler passes the NaN through.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from onnx import TensorProto
from river import compose, forest, linear_model, preprocessing, tree
from river.optim.losses import BinaryLoss, Poisson, RegressionLoss

from cloud.compile.errors import CompileError, UnsupportedModelError
from cloud.compile.graph import GraphBuilder
from cloud.compile.model import CompiledModel, Kind
from cloud.compile.trees import classifier_tree_probas, regressor_tree_values

__all__ = ["DEFAULT_OPSET", "SUPPORTED", "compile_pipeline", "public_name"]

DEFAULT_OPSET = 21
MIN_OPSET = 18  # ReduceMax/ReduceSum with axes as an input

SUPPORTED = (
    "river.preprocessing.StandardScaler",
    "river.linear_model.LinearRegression",
    "river.linear_model.LogisticRegression",
    "river.tree.HoeffdingTreeClassifier",
    "river.tree.HoeffdingTreeRegressor",
    "river.forest.ARFClassifier",
    "river.forest.ARFRegressor",
)

_FINAL: dict[type, Kind] = {
    linear_model.LinearRegression: "regressor",
    linear_model.LogisticRegression: "classifier",
    tree.HoeffdingTreeClassifier: "classifier",
    tree.HoeffdingTreeRegressor: "regressor",
    forest.ARFClassifier: "classifier",
    forest.ARFRegressor: "regressor",
}


def public_name(obj: Any) -> str:
    """``river.preprocessing.OneHotEncoder`` rather than ``river.preprocessing.one_hot...``."""
    cls = type(obj)
    parts = cls.__module__.split(".")
    prefix = ".".join(parts[:2]) if parts[0] == "river" else cls.__module__
    return f"{prefix}.{cls.__qualname__}"


def _unsupported(step_name: str, obj: Any, why: str = "") -> UnsupportedModelError:
    detail = f": {why}" if why else ""
    return UnsupportedModelError(
        f"step {step_name!r} ({public_name(obj)}) is not supported{detail}; supported: "
        f"{', '.join(SUPPORTED)} (optionally chained in a compose.Pipeline)"
    )


def _steps(model: Any) -> list[tuple[str, Any]]:
    if isinstance(model, compose.Pipeline):
        out: list[tuple[str, Any]] = []
        for name, step in model.steps.items():
            out.extend(_steps(step) if isinstance(step, compose.Pipeline) else [(name, step)])
        return out
    return [(type(model).__name__, model)]


def compile_pipeline(
    model: Any,
    features: list[str],
    *,
    name: str = "model",
    opset: int = DEFAULT_OPSET,
) -> CompiledModel:
    """Compile a river estimator or ``compose.Pipeline`` to ONNX (float64 in, float64 out).

    The model is read, never modified. ``features`` fixes the input column order; a model that
    depends on a feature outside it is a ``CompileError``. Raises ``UnsupportedModelError``
    for any step or configuration that cannot be reproduced exactly.
    """
    t0 = time.perf_counter()
    features = list(features)
    if not features or len(set(features)) != len(features):
        raise CompileError(f"features: expected a non-empty list of unique names, got {features}")
    if opset < MIN_OPSET:
        raise CompileError(f"opset {opset}: the compiler emits ONNX opset >= {MIN_OPSET}")
    steps = _steps(model)
    *pre, (final_name, final) = steps
    for step_name, step in pre:
        if type(step) is not preprocessing.StandardScaler:
            raise _unsupported(step_name, step)
    kind = _FINAL.get(type(final))
    if kind is None:
        if type(final) is preprocessing.StandardScaler:
            raise _unsupported(final_name, final, "a pipeline must end with a predictor")
        raise _unsupported(final_name, final)

    g = GraphBuilder(len(features))
    x = g.input
    for step_name, scaler in pre:
        x = _scaler(g, x, scaler, features, step_name)

    classes: tuple[Any, ...] = ()
    where = f"step {final_name!r} ({public_name(final)})"
    if isinstance(final, linear_model.LogisticRegression):
        p = _linear(g, x, final, features, where, "classifier")
        one = g.const("one", 1.0)
        probas = g.op("Concat", g.op("Sub", one, p), p, axis=1, hint="probas")
        classes = (False, True)
    elif isinstance(final, linear_model.LinearRegression):
        value = _linear(g, x, final, features, where, "regressor")
    elif isinstance(final, tree.HoeffdingTreeClassifier):
        classes = _classes([final], where)
        per_tree = classifier_tree_probas(g, x, [final], list(classes), features, where)
        probas = g.op("Squeeze", per_tree, g.const("ax1", [1], np.int64), hint="probas")
    elif isinstance(final, forest.ARFClassifier):
        probas, classes = _arf_classifier(g, x, final, features, where)
    elif isinstance(final, tree.HoeffdingTreeRegressor):
        per_tree = regressor_tree_values(g, x, [final], features, where)
        value = g.op("Squeeze", per_tree, g.const("ax1", [1], np.int64), hint="value_col")
    else:
        value = _arf_regressor(g, x, final, features, where)

    if kind == "classifier":
        outputs = _classifier_outputs(g, probas, len(classes))
    else:
        value = g.op("Reshape", value, g.const("shape_n", [-1], np.int64), hint="value_flat")
        g.alias(value, "value")
        outputs = [("value", TensorProto.DOUBLE, ["N"])]

    source = "river: " + " | ".join(public_name(s) for _, s in steps)
    compiled = CompiledModel(
        onnx=b"",
        name=name,
        kind=kind,
        features=tuple(features),
        classes=classes,
        opset=opset,
        source=source,
    )
    proto = g.build(name, outputs, opset, compiled.metadata())
    return CompiledModel(
        onnx=proto.SerializeToString(),
        name=name,
        kind=kind,
        features=tuple(features),
        classes=classes,
        opset=opset,
        source=source,
        compile_seconds=time.perf_counter() - t0,
    )


def _classifier_outputs(
    g: GraphBuilder, probas: str, n_classes: int
) -> list[tuple[str, int, list[Any]]]:
    # ArgMax keeps the first maximum, as river's max(proba, key=proba.get) over sorted classes
    label = g.op("ArgMax", probas, axis=1, keepdims=0, select_last_index=0, hint="label_idx")
    if n_classes == 2:
        ends = g.const("s", [1], np.int64), g.const("e", [2], np.int64), g.const("a", [1], np.int64)
        prob = g.op("Slice", probas, *ends, hint="positive")
    else:
        prob = g.reduce("ReduceMax", probas, axis=1, keepdims=True, hint="top")
    prob = g.op("Reshape", prob, g.const("shape_n", [-1], np.int64), hint="probability_flat")
    g.alias(label, "label")
    g.alias(prob, "probability")
    g.alias(probas, "probabilities")
    return [
        ("label", TensorProto.INT64, ["N"]),
        ("probability", TensorProto.DOUBLE, ["N"]),
        ("probabilities", TensorProto.DOUBLE, ["N", n_classes]),
    ]


def _scaler(g: GraphBuilder, x: str, scaler: Any, features: list[str], step: str) -> str:
    windowed = scaler.window_size is not None

    def stat(table: Any, f: str) -> float:
        if f not in table:
            return 0.0  # river's defaultdict default: mean 0, variance 0 -> output 0.0
        return float(table[f].get()) if windowed else float(table[f])

    means = np.array([stat(scaler.means, f) for f in features])
    centred = g.op("Sub", x, g.const(f"{step}_mean", means), hint="centred")
    if not scaler.with_std:
        return centred
    variances = [stat(scaler.vars, f) for f in features]
    # transform_one: (x - mean) / var ** 0.5 if var else 0.0 -- same division, so bit-identical
    std = np.array([v**0.5 if v else 1.0 for v in variances])
    nonzero = np.array([bool(v) for v in variances])
    scaled = g.op("Div", centred, g.const(f"{step}_std", std), hint="scaled")
    zero_or_nan = g.op("Where", g.op("IsNaN", x), x, g.const("zero", 0.0), hint="zero_or_nan")
    return g.op(
        "Where",
        g.const(f"{step}_var_nonzero", nonzero, np.bool_),
        scaled,
        zero_or_nan,
        hint="scaled",
    )


def _linear(g: GraphBuilder, x: str, est: Any, features: list[str], where: str, kind: Kind) -> str:
    weights = np.zeros((len(features), 1))
    for fname, w in est._weights.to_dict().items():
        if fname not in features:
            if w == 0:
                continue
            raise CompileError(
                f"{where}: the model weighs feature {fname!r}, which is not in the feature list "
                f"{features}"
            )
        weights[features.index(fname), 0] = w
    x0 = g.nan_to_zero(x)
    z = g.op(
        "Add",
        g.op("MatMul", x0, g.const("weights", weights)),
        g.const("intercept", float(est.intercept)),
        hint="z",
    )
    mean_func = type(est.loss).mean_func
    if kind == "regressor":
        if mean_func is RegressionLoss.mean_func:
            return z
        if mean_func is Poisson.mean_func:
            return g.op("Exp", z, hint="poisson_mean")
        raise UnsupportedModelError(
            f"{where}: loss {type(est.loss).__name__} has a mean function the compiler does not know"
        )
    if mean_func is not BinaryLoss.mean_func:
        raise UnsupportedModelError(
            f"{where}: loss {type(est.loss).__name__} has a mean function the compiler does not know"
        )
    # utils.math.sigmoid: 0 below -30, 1 above 30, else 1 / (1 + exp(-z))
    one = g.const("one", 1.0)
    sig = g.op("Div", one, g.op("Add", one, g.op("Exp", g.op("Neg", z))), hint="sigmoid")
    hi = g.op("Where", g.op("Greater", z, g.const("z_hi", 30.0)), one, sig, hint="sig_hi")
    return g.op(
        "Where", g.op("Less", z, g.const("z_lo", -30.0)), g.const("zero", 0.0), hi, hint="p"
    )


def _classes(trees: list[Any], where: str) -> tuple[Any, ...]:
    seen: set[Any] = set()
    for t in trees:
        seen |= set(t.classes)
    if not seen:
        raise CompileError(f"{where}: the model has not seen any labelled sample yet")
    try:
        return tuple(sorted(seen))
    except TypeError as e:
        raise CompileError(f"{where}: class labels {seen!r} cannot be ordered: {e}") from None


def _arf_classifier(
    g: GraphBuilder, x: str, arf: Any, features: list[str], where: str
) -> tuple[str, tuple[Any, ...]]:
    trees = list(arf)
    if not trees:
        raise CompileError(f"{where}: the forest has not learned anything yet (no trees)")
    classes = _classes(trees, where)
    per_tree = classifier_tree_probas(g, x, trees, list(classes), features, where)
    # ARFClassifier.predict_proba_one: each tree's proba times its metric when weighted voting is
    # on and the metric is > 0, summed, then normalised when the total is > 0
    w = []
    for i in range(len(trees)):
        m = arf._metrics[i].get()
        w.append(m if (not arf.disable_weighted_vote and m > 0.0) else 1.0)
    weights = g.const("tree_weights", np.array(w).reshape(1, -1, 1))
    summed = g.reduce(
        "ReduceSum", g.op("Mul", per_tree, weights), axis=1, keepdims=False, hint="votes"
    )
    total = g.reduce("ReduceSum", summed, axis=1, keepdims=True, hint="votes_total")
    normed = g.op("Div", summed, total, hint="votes_norm")
    positive = g.op("Greater", total, g.const("zero", 0.0))
    return g.op("Where", positive, normed, summed, hint="probas"), classes


def _arf_regressor(g: GraphBuilder, x: str, arf: Any, features: list[str], where: str) -> str:
    trees = list(arf)
    if not trees:
        raise CompileError(f"{where}: the forest has not learned anything yet (no trees)")
    n = len(trees)
    values = regressor_tree_values(g, x, trees, features, where)  # [N, T]
    if arf.aggregation_method == arf._MEDIAN:
        ordered = g.op(
            "TopK",
            values,
            g.const("k", [n], np.int64),
            axis=1,
            largest=1,
            sorted=1,
            n_outputs=2,
            hint="sorted",
        )
        lo, hi = (n - 1) // 2, n // 2
        a = g.op("Gather", ordered, g.const("mid_lo", lo, np.int64), axis=1, hint="mid_lo")
        if lo == hi:
            return a
        b = g.op("Gather", ordered, g.const("mid_hi", hi, np.int64), axis=1, hint="mid_hi")
        return g.op("Div", g.op("Add", a, b), g.const("two", 2.0), hint="median")
    # mean aggregation: weighted by (sum - metric) / normaliser when weighting is on, then the
    # *mean* of the weighted predictions, exactly as ARFRegressor.predict_one
    w = np.ones(n)
    if not arf.disable_weighted_vote:
        metric = np.array([arf._metrics[i].get() for i in range(n)], dtype=float)
        total = 0.0
        for v in metric:
            total += v
        if total != 0:
            w = total - metric
            w /= w.sum()
    weighted = g.op("Mul", values, g.const("tree_weights", w.reshape(1, -1)))
    return g.reduce("ReduceMean", weighted, axis=1, keepdims=False, hint="mean")
