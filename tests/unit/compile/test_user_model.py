"""Validation of user-supplied ONNX models: accepted exports are adapted to the edgeloop I/O
contract; bad files are refused with a message that says what is wrong."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import to_onnx
from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LinearRegression, LogisticRegression

from cloud.compile import UserModelError, validate_user_model
from cloud.compile.runtime import new_session

FEATURES = ["temp", "pressure", "speed"]
RNG = np.random.default_rng(3)
X = RNG.standard_normal((300, 3))
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)


def _sk_logreg(**options):
    clf = LogisticRegression().fit(X, Y)
    onx = to_onnx(
        clf, initial_types=[("float_input", FloatTensorType([None, 3]))], options=options or None
    )
    return clf, onx.SerializeToString()


def _tiny(inputs, body, out_type=TensorProto.FLOAT, out_shape=(None, 2), opset=17):
    graph = helper.make_graph(
        body,
        "tiny",
        inputs,
        [helper.make_tensor_value_info("y", out_type, list(out_shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model.SerializeToString()


def _float_input(name="x", width=3, batch=None, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, [batch, width])


def test_sklearn_logistic_regression_with_zipmap_is_accepted_and_adapted():
    clf, blob = _sk_logreg()
    report = validate_user_model(blob, FEATURES, "classifier", name="sk-logreg")
    model = report.model
    assert model.kind == "classifier" and model.classes == (0, 1)
    assert model.output_names == ("label", "probability", "probabilities")
    assert report.original_input == "float_input" and report.original_dtype == "float32"
    assert report.original_outputs == ("output_label", "output_probability")
    assert report.test_rows == 64 and report.latency_calls == 200
    assert 0 < report.latency_p50_ms <= report.latency_p99_ms
    # the adapted artifact gives sklearn's probabilities (float32 inside the user's graph)
    sess = new_session(model.onnx)
    label, prob, probas = sess.run(None, {"features": X[:50]})
    np.testing.assert_allclose(probas, clf.predict_proba(X[:50]), atol=1e-6)
    np.testing.assert_array_equal(label, clf.predict(X[:50]))
    np.testing.assert_array_equal(prob, probas[:, 1])
    meta = {p.key: p.value for p in onnx.load_model_from_string(model.onnx).metadata_props}
    assert json.loads(meta["edgeloop.features"]) == FEATURES
    assert meta["edgeloop.source"].startswith("user: skl2onnx")


def test_sklearn_models_without_zipmap_and_regressors_are_accepted():
    _, blob = _sk_logreg(zipmap=False)
    assert validate_user_model(blob, FEATURES, "classifier").model.classes == (0, 1)
    forest = RandomForestClassifier(n_estimators=4, random_state=0).fit(
        X, (X[:, 0] * 2).astype(int) % 3
    )
    blob = to_onnx(
        forest, initial_types=[("x", FloatTensorType([None, 3]))], options={"zipmap": False}
    )
    report = validate_user_model(blob.SerializeToString(), FEATURES, "classifier")
    assert report.model.classes == (0, 1, 2)
    reg = LinearRegression().fit(X, X @ [1.0, 2.0, 3.0])
    blob = to_onnx(reg, initial_types=[("x", DoubleTensorType([None, 3]))]).SerializeToString()
    report = validate_user_model(blob, FEATURES, "regressor")
    (value,) = new_session(report.model.onnx).run(["value"], {"features": X[:10]})
    np.testing.assert_allclose(value, reg.predict(X[:10]), atol=1e-9)


def test_a_sigmoid_column_is_read_as_the_positive_class_probability():
    w = numpy_helper.from_array(np.array([[1.0], [0.0], [0.0]], dtype=np.float32), "w")
    blob = _tiny(
        [_float_input()],
        [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Sigmoid", ["z"], ["y"])],
        out_shape=(None, 1),
    )
    model = onnx.load_model_from_string(blob)
    model.graph.initializer.append(w)
    report = validate_user_model(model.SerializeToString(), FEATURES, "classifier")
    _, prob, probas = new_session(report.model.onnx).run(None, {"features": X[:5]})
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-X[:5, 0])), rtol=1e-6)
    np.testing.assert_allclose(probas.sum(axis=1), 1.0)


@pytest.mark.parametrize(
    "blob",
    [b"", b"this is not a model", None],
    ids=["empty", "text", "truncated"],
)
def test_files_that_are_not_onnx_are_refused(blob):
    if blob is None:
        _, full = _sk_logreg()
        blob = full[: len(full) // 2]
    with pytest.raises(UserModelError, match=r"not an ONNX model|invalid ONNX model"):
        validate_user_model(blob, FEATURES, "classifier")


def test_a_model_with_two_inputs_is_refused():
    blob = _tiny(
        [_float_input("a"), _float_input("b")],
        [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Softmax", ["s"], ["y"])],
        out_shape=(None, 3),
    )
    with pytest.raises(
        UserModelError, match=r"has 2 inputs \('a', 'b'\); edgeloop feeds exactly one \[N, 3\]"
    ):
        validate_user_model(blob, FEATURES, "classifier")


def test_a_model_of_the_wrong_width_is_refused():
    _, blob = _sk_logreg()
    with pytest.raises(UserModelError, match="width 3, but the feature list has 4 features"):
        validate_user_model(blob, [*FEATURES, "vibration"], "classifier")


def test_a_model_with_an_integer_input_is_refused():
    blob = _tiny(
        [_float_input(dtype=TensorProto.INT64)],
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        out_shape=(None, 3),
    )
    with pytest.raises(UserModelError, match="dtype int64; expected float32 or float64"):
        validate_user_model(blob, FEATURES, "regressor")


def test_a_model_with_a_fixed_batch_size_is_refused():
    blob = _tiny(
        [_float_input(batch=1)], [helper.make_node("Softmax", ["x"], ["y"])], out_shape=(1, 3)
    )
    with pytest.raises(UserModelError, match="fixed batch size of 1"):
        validate_user_model(blob, FEATURES, "classifier")


def test_a_model_that_outputs_nan_is_refused():
    # log(-(x*x) - 1) is NaN for every input
    one = numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")
    body = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("Add", ["sq", "one"], ["pos"]),
        helper.make_node("Neg", ["pos"], ["neg"]),
        helper.make_node("Log", ["neg"], ["y"]),
    ]
    model = onnx.load_model_from_string(_tiny([_float_input()], body, out_shape=(None, 3)))
    model.graph.initializer.append(one)
    with pytest.raises(UserModelError, match="output 'y' is NaN for 64 of 64 test rows"):
        validate_user_model(model.SerializeToString(), FEATURES, "classifier")
    with pytest.raises(
        UserModelError, match=r"gives 3 values per row .* a regressor must give one"
    ):
        validate_user_model(model.SerializeToString(), FEATURES, "regressor")
    # one column: a regressor whose every value is NaN
    ones = numpy_helper.from_array(np.ones((3, 1), dtype=np.float32), "ones")
    body[-1] = helper.make_node("Log", ["neg"], ["logs"])
    body.append(helper.make_node("MatMul", ["logs", "ones"], ["y"]))
    model = onnx.load_model_from_string(_tiny([_float_input()], body, out_shape=(None, 1)))
    model.graph.initializer.extend([one, ones])
    with pytest.raises(UserModelError, match="output 'y' is NaN for 64 of 64 test rows"):
        validate_user_model(model.SerializeToString(), FEATURES, "regressor")


def test_raw_scores_are_not_accepted_as_probabilities():
    blob = _tiny(
        [_float_input()], [helper.make_node("Identity", ["x"], ["y"])], out_shape=(None, 3)
    )
    with pytest.raises(UserModelError, match="not a probability"):
        validate_user_model(blob, FEATURES, "classifier")


def test_a_regressor_without_a_float_output_is_refused():
    blob = _tiny(
        [_float_input()],
        [helper.make_node("ArgMax", ["x"], ["y"], axis=1, keepdims=0)],
        out_type=TensorProto.INT64,
        out_shape=(None,),
    )
    with pytest.raises(UserModelError, match="no output can be read as values"):
        validate_user_model(blob, FEATURES, "regressor")


def test_live_frames_can_form_the_test_batch():
    _, blob = _sk_logreg()
    frames = [{"temp": 1.0, "pressure": 2.0, "speed": 3.0}] * 7
    report = validate_user_model(blob, FEATURES, "classifier", sample=frames, latency_calls=20)
    assert report.test_rows == 7 and report.latency_calls == 20
