"""Compiled river models: onnxruntime inference (batch 1 and 256) next to river's own
predict_proba_one on the same model and frames, and next to a scikit-learn model of the same
shape exported by skl2onnx, all in the same run; plus compile time and parity.

The skl2onnx comparison: for the linear pipeline it is the *same* model (river's scaler
statistics and weights copied into sklearn's StandardScaler + LogisticRegression, exported as
float32 as skl2onnx does by default); for trees it is a DecisionTree/RandomForest fitted on the
same samples with a similar leaf count -- the same kind of work, not the same tree.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
from river import forest, linear_model, preprocessing, tree
from river.datasets import synth

from bench.common import Result, rate
from cloud.compile import check_parity, compile_pipeline
from cloud.compile.runtime import frames_to_matrix, new_session, present_features

N_LEARN, N_HELD, BATCH = 3000, 512, 256


def _sklearn_same_logreg(model, features):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scaler, lr = model["StandardScaler"], model["LogisticRegression"]
    sk_scaler = StandardScaler()
    sk_scaler.mean_ = np.array([scaler.means[f] for f in features])
    var = np.array([scaler.vars[f] for f in features])
    sk_scaler.scale_ = np.where(var > 0, np.sqrt(var), 1.0)
    sk_scaler.var_, sk_scaler.n_features_in_ = var, len(features)
    sk_lr = LogisticRegression()
    w = lr.weights
    sk_lr.coef_ = np.array([[w.get(f, 0.0) for f in features]])
    sk_lr.intercept_ = np.array([lr.intercept])
    sk_lr.classes_ = np.array([0, 1])
    return make_pipeline(sk_scaler, sk_lr)


def _sklearn_tree(kind, x, y, leaves):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.tree import DecisionTreeClassifier

    if kind == "forest":
        return RandomForestClassifier(
            n_estimators=5, max_leaf_nodes=max(leaves, 2), random_state=0
        ).fit(x, y)
    return DecisionTreeClassifier(max_leaf_nodes=max(leaves, 2), random_state=0).fit(x, y)


def _onnx_rates(sess, input_name, x):
    rows = [x[i : i + 1] for i in range(len(x))]
    batches = [x[i : i + BATCH] for i in range(0, len(x) - BATCH + 1, BATCH)]
    it1, itb = itertools.cycle(rows), itertools.cycle(batches)

    def one():
        sess.run(None, {input_name: next(it1)})
        return 1

    def many():
        sess.run(None, {input_name: next(itb)})
        return BATCH

    return rate(one, 0.5), rate(many, 0.5)


def _case(label, make, skl_kind):
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    model = make()
    data = list(
        itertools.islice(synth.Agrawal(classification_function=2, seed=7), N_LEARN + N_HELD)
    )
    features = sorted(data[0][0])
    for x, y in data[:N_LEARN]:
        model.learn_one(x, y)
    frames = [x for x, _ in data[N_LEARN:]]
    t0 = time.perf_counter()
    compiled = compile_pipeline(model, features, name=label)
    compile_ms = (time.perf_counter() - t0) * 1e3
    parity = check_parity(model, compiled, frames)
    x_held = frames_to_matrix(frames, features)
    sess = new_session(compiled.onnx)
    onnx_1, onnx_b = _onnx_rates(sess, "features", x_held)
    river_frames = itertools.cycle([present_features(f, features) for f in frames])

    def river_one():
        model.predict_proba_one(next(river_frames))
        return 1

    river_rate = rate(river_one, 0.5)

    x_train = frames_to_matrix([x for x, _ in data[:N_LEARN]], features)
    y_train = np.array([y for _, y in data[:N_LEARN]], dtype=int)
    if skl_kind == "same-logreg":
        sk = _sklearn_same_logreg(model, features)
        sk_name = "skl2onnx same model"
    else:
        final = model
        leaves = (
            max(t.n_leaves or 1 for t in final) if skl_kind == "forest" else (final.n_leaves or 1)
        )
        sk = _sklearn_tree(skl_kind, x_train, y_train, leaves)
        sk_name = f"skl2onnx {type(sk).__name__}"
    sk_onnx = to_onnx(
        sk, initial_types=[("x", FloatTensorType([None, len(features)]))], options={"zipmap": False}
    ).SerializeToString()
    sk_1, sk_b = _onnx_rates(new_session(sk_onnx), "x", x_held.astype(np.float32))
    name = f"compile/{label}"
    return [
        Result(name, "onnx batch=1", onnx_1, "rows/s", "river predict_proba_one", river_rate),
        Result(name, "onnx batch=1 (vs skl2onnx)", onnx_1, "rows/s", f"{sk_name} batch=1", sk_1),
        Result(name, f"onnx batch={BATCH}", onnx_b, "rows/s", f"{sk_name} batch={BATCH}", sk_b),
        Result(
            name,
            "parity max|river-onnx|",
            parity.max_abs_diff,
            "abs",
            target="<= 1e-5",
            higher_is_better=False,
        ),
        Result(name, "compile time", compile_ms, "ms", higher_is_better=False),
    ]


def run() -> list[Result]:
    cases = [
        (
            "scaler|logreg",
            lambda: preprocessing.StandardScaler() | linear_model.LogisticRegression(),
            "same-logreg",
        ),
        (
            "htc-mc",
            lambda: tree.HoeffdingTreeClassifier(grace_period=50, delta=1e-3, leaf_prediction="mc"),
            "tree",
        ),
        ("htc-nba", lambda: tree.HoeffdingTreeClassifier(grace_period=50, delta=1e-3), "tree"),
        (
            "arf5-mc",
            lambda: forest.ARFClassifier(n_models=5, leaf_prediction="mc", seed=1),
            "forest",
        ),
    ]
    out: list[Result] = []
    for label, make, kind in cases:
        out.extend(_case(label, make, kind))
    return out
