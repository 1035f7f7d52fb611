"""The compiler conformance suite: every supported pipeline, learned online on several streams,
must give the same output through ONNX as through river, to 1e-5, on held-out frames."""

from __future__ import annotations

import json
import random

import numpy as np
import onnx
import pytest
from river import compose, forest, linear_model, preprocessing, tree
from river.tree.splitter import HistogramSplitter, QOSplitter

from cloud.compile import (
    CompileError,
    UnsupportedModelError,
    check_parity,
    compile_pipeline,
)
from cloud.compile.runtime import frames_to_matrix, new_session, present_features

from .streams import (
    classification_streams,
    classifiers,
    learn,
    regression_streams,
    regressors,
    with_missing,
)

N_LEARN, N_HELD, ATOL = 3000, 300, 1e-5


def _trees(model):
    final = model[-1] if isinstance(model, compose.Pipeline) else model
    if isinstance(final, forest.ARFClassifier | forest.ARFRegressor):
        return list(final)
    if isinstance(final, tree.HoeffdingTreeClassifier | tree.HoeffdingTreeRegressor):
        return [final]
    return []


def _assert_parity(model, features, frames, name):
    compiled = compile_pipeline(model, features, name=name)
    full = check_parity(model, compiled, frames, atol=ATOL)
    assert full.passed, full.reason
    assert full.n == len(frames) and full.max_abs_diff <= ATOL
    assert full.label_mismatches == 0
    missing = check_parity(model, compiled, with_missing(frames, 0.2, seed=5), atol=ATOL)
    assert missing.passed, f"with missing features: {missing.reason}"
    return compiled


@pytest.mark.parametrize("stream", sorted(classification_streams()))
@pytest.mark.parametrize("pipeline", sorted(classifiers()))
def test_classifier_matches_river_on_held_out_frames(pipeline, stream):
    model = classifiers()[pipeline]()
    features, frames = learn(model, classification_streams()[stream](), N_LEARN, N_HELD)
    for t in _trees(model):  # the tree must really have grown, or routing is untested
        assert t.n_branches >= 1, f"{pipeline} did not split on {stream}"
    compiled = _assert_parity(model, features, frames, f"{pipeline}-{stream}")
    assert compiled.kind == "classifier"
    # labels agree with river's predict_one too
    sess = new_session(compiled.onnx)
    (labels,) = sess.run(["label"], {"features": frames_to_matrix(frames, features)})
    expected = [model.predict_one(present_features(f, features)) for f in frames]
    assert [compiled.classes[i] for i in labels] == expected


@pytest.mark.parametrize("stream", sorted(regression_streams()))
@pytest.mark.parametrize("pipeline", sorted(regressors()))
def test_regressor_matches_river_on_held_out_frames(pipeline, stream):
    model = regressors()[pipeline]()
    features, frames = learn(model, regression_streams()[stream](), N_LEARN, N_HELD)
    for t in _trees(model):
        assert t.n_branches >= 1, f"{pipeline} did not split on {stream}"
    compiled = _assert_parity(model, features, frames, f"{pipeline}-{stream}")
    assert compiled.kind == "regressor"


def test_compiled_model_follows_the_io_contract():
    model = preprocessing.StandardScaler() | tree.HoeffdingTreeClassifier(grace_period=50)
    features, frames = learn(model, classification_streams()["agrawal"](), 1000, 10)
    compiled = compile_pipeline(model, features, name="press-7")
    proto = onnx.load_model_from_string(compiled.onnx)
    (inp,) = proto.graph.input
    assert inp.name == "features"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [0, len(features)]
    assert [o.name for o in proto.graph.output] == ["label", "probability", "probabilities"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["edgeloop.features"]) == features
    assert json.loads(meta["edgeloop.classes"]) == list(compiled.classes) == [0, 1]
    assert meta["edgeloop.kind"] == "classifier"
    assert "river.tree.HoeffdingTreeClassifier" in meta["edgeloop.source"]
    sess = new_session(compiled.onnx)
    x = frames_to_matrix(frames, features)
    label, prob, probas = sess.run(None, {"features": x})
    assert label.dtype == np.int64 and prob.shape == (10,) and probas.shape == (10, 2)
    np.testing.assert_array_equal(prob, probas[:, 1])  # P(positive class = classes[-1])
    assert compiled.describe()["sha256"] == compiled.sha256


def _coded_stream(seed):
    """A machine's recipe code (nominal) and a temperature; scrap depends on both."""
    rng = random.Random(seed)
    while True:
        code, temp = float(rng.randrange(6)), rng.gauss(0.0, 1.0)
        y = (code in (1.0, 3.0, 4.0)) != (temp > 1.2)
        if rng.random() < 0.05:
            y = not y
        yield {"recipe": code, "temp": temp}, y


@pytest.mark.parametrize(
    ("binary", "branch"), [(False, "NominalMultiwayBranch"), (True, "NominalBinaryBranch")]
)
def test_nominal_splits_are_compiled_exactly(binary, branch):
    model = tree.HoeffdingTreeClassifier(
        grace_period=50,
        delta=1e-3,
        leaf_prediction="mc",
        nominal_attributes=["recipe"],
        binary_split=binary,
    )
    features, frames = learn(model, _coded_stream(7), 2000, 300)
    assert branch in {type(n).__name__ for n in model._root.iter_branches()}
    # an unseen nominal value takes the most travelled branch, as in river
    frames += [{**f, "recipe": 99.0} for f in frames[:20]]
    _assert_parity(model, features, frames, "nominal")


def test_numeric_multiway_splits_are_compiled_exactly():
    model = tree.HoeffdingTreeRegressor(
        grace_period=50,
        leaf_prediction="mean",
        splitter=QOSplitter(radius=0.05, allow_multiway_splits=True),
    )
    features, frames = learn(model, regression_streams()["friedman"](), 2000, 300)
    branches = [type(n).__name__ for n in model._root.iter_branches()]
    assert "NumericMultiwayBranch" in branches
    frames += [{**f, "x_0": 7.5} for f in frames[:20]]  # a slot never seen in training
    _assert_parity(model, features, frames, "qo-multiway")


def test_majority_class_leaves_work_with_any_splitter():
    model = tree.HoeffdingTreeClassifier(
        grace_period=50, leaf_prediction="mc", splitter=HistogramSplitter()
    )
    features, frames = learn(model, classification_streams()["sea"](), 2000, 200)
    _assert_parity(model, features, frames, "histogram-mc")


def test_parity_gate_fails_when_the_model_moved_on_after_compiling():
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    stream = classification_streams()["hyperplane"]()
    features, frames = learn(model, stream, 1000, 200)
    compiled = compile_pipeline(model, features)
    for _ in range(500):
        x, y = next(stream)
        model.learn_one(x, y)
    report = check_parity(model, compiled, frames)
    assert not report.passed
    assert report.max_abs_diff > 1e-5
    assert "atol" in report.reason and f"row {report.worst_row}" in report.reason


def test_parity_gate_fails_on_a_class_the_compiled_model_does_not_know():
    model = tree.HoeffdingTreeClassifier(leaf_prediction="mc")
    for i in range(50):
        model.learn_one({"a": float(i)}, "ok")
    compiled = compile_pipeline(model, ["a"])
    model.learn_one({"a": 1.0}, "scrap")
    report = check_parity(model, compiled, [{"a": 1.0}])
    assert not report.passed
    assert "'scrap'" in report.reason and "recompile" in report.reason


def test_parity_gate_needs_frames():
    model = linear_model.LinearRegression()
    model.learn_one({"a": 1.0}, 2.0)
    report = check_parity(model, compile_pipeline(model, ["a"]), [])
    assert not report.passed and report.n == 0 and "no frames" in report.reason


def test_unsupported_step_is_named_with_the_supported_list():
    model = preprocessing.OneHotEncoder() | linear_model.LogisticRegression()
    with pytest.raises(UnsupportedModelError) as err:
        compile_pipeline(model, ["a"])
    msg = str(err.value)
    assert "step 'OneHotEncoder' (river.preprocessing.OneHotEncoder) is not supported" in msg
    assert "supported: river.preprocessing.StandardScaler" in msg
    assert "river.tree.HoeffdingTreeClassifier" in msg


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        (preprocessing.MinMaxScaler() | linear_model.LinearRegression(), "MinMaxScaler"),
        (tree.HoeffdingAdaptiveTreeClassifier(), "HoeffdingAdaptiveTreeClassifier"),
        (linear_model.PARegressor(), "PARegressor"),
        (preprocessing.StandardScaler(), "must end with a predictor"),
    ],
    ids=["minmax", "hatc", "pa", "scaler-only"],
)
def test_unsupported_estimators_are_refused(model, needle):
    with pytest.raises(UnsupportedModelError, match=needle):
        compile_pipeline(model, ["a"])


def test_naive_bayes_leaves_with_a_non_gaussian_splitter_are_refused():
    model = tree.HoeffdingTreeClassifier(
        grace_period=50, leaf_prediction="nb", splitter=HistogramSplitter()
    )
    features, _ = learn(model, classification_streams()["sea"](), 500, 0)
    with pytest.raises(UnsupportedModelError, match=r"GaussianSplitter.*leaf_prediction='mc'"):
        compile_pipeline(model, features)


def test_model_leaves_other_than_linear_regression_are_refused():
    model = tree.HoeffdingTreeRegressor(
        grace_period=50, leaf_prediction="model", leaf_model=linear_model.PARegressor()
    )
    features, _ = learn(model, regression_streams()["friedman"](), 300, 0)
    with pytest.raises(UnsupportedModelError, match="PARegressor"):
        compile_pipeline(model, features)


def test_a_feature_outside_the_list_is_a_compile_error():
    model = linear_model.LinearRegression()
    model.learn_one({"a": 1.0, "b": 2.0}, 1.0)
    with pytest.raises(CompileError, match="'b', which is not in the feature list"):
        compile_pipeline(model, ["a"])
    tree_model = tree.HoeffdingTreeClassifier(grace_period=50, delta=1e-3, leaf_prediction="mc")
    features, _ = learn(tree_model, classification_streams()["sea"](), 2000, 0)
    assert tree_model.n_branches >= 1
    with pytest.raises(CompileError, match="not in the feature list"):
        compile_pipeline(tree_model, features[:1])


def test_models_that_learned_nothing_are_compile_errors():
    with pytest.raises(CompileError, match="not seen any labelled sample"):
        compile_pipeline(tree.HoeffdingTreeClassifier(), ["a"])
    with pytest.raises(CompileError, match="no trees"):
        compile_pipeline(forest.ARFRegressor(), ["a"])


def test_bad_arguments_are_refused():
    model = linear_model.LinearRegression()
    with pytest.raises(CompileError, match="unique names"):
        compile_pipeline(model, ["a", "a"])
    with pytest.raises(CompileError, match="opset >= 18"):
        compile_pipeline(model, ["a"], opset=17)
