"""The model slot: skl2onnx models scored in one batched call, clear refusals, atomic swap."""

from __future__ import annotations

import numpy as np
import pytest

from edge.frames import PendingFrame
from edge.inference import ModelLoadError, ModelSlot, load_model
from shared.manifest import ModelManifest, sha256_hex
from tests.unit.edge.modelkit import FEATURES, export

T0 = 1_700_000_000_000_000_000


def pending(i, feats):
    return PendingFrame("m1", f"m1-{i}", T0 + i, feats, ())


def test_frames_are_scored_in_one_call_matching_sklearn(tmp_path):
    path, mpath, sk = export(tmp_path)
    calls = []
    slot = ModelSlot(observe_latency=calls.append)
    slot.swap(load_model(path, mpath))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 3)) * [5.0, 1.0, 2.0] + [50.0, 3.0, 10.0]
    # features arrive in any dict order: the manifest decides the column order
    frames = [
        pending(i, {FEATURES[2]: row[2], FEATURES[0]: row[0], FEATURES[1]: row[1]})
        for i, row in enumerate(x)
    ]
    out = slot.score(frames)
    assert len(calls) == 1  # one batched model call for the whole tick
    assert [f.prediction for f in out] == [float(v) for v in sk.predict(x)]
    probs = sk.predict_proba(x)[:, 1]
    assert [f.score for f in out] == pytest.approx(probs, abs=1e-5)
    assert {f.model_version for f in out} == {1}


def test_scored_frames_are_ordinary_checked_frames(tmp_path):
    """score builds frames without re-running their checks: each equals (and hashes like) the
    frame the record's own constructor builds and validates from the same fields."""
    from shared.records import Frame
    from shared.wire import Batch, Kind, decode_batch, encode_batch

    path, mpath, _ = export(tmp_path)
    slot = ModelSlot()
    slot.swap(load_model(path, mpath))
    feats = {FEATURES[0]: 50.0, FEATURES[1]: 3.0, FEATURES[2]: float("nan")}
    frames = [PendingFrame("m1", "m1-1", T0, feats, ["x"]), pending(2, {"other": 1.0})]
    out = slot.score(frames)
    for got in out:
        checked = Frame(
            got.asset,
            got.key,
            got.ts_ns,
            got.features,
            got.prediction,
            got.model_version,
            got.score,
            got.marks,
        )
        assert got == checked and type(got.marks) is tuple
    assert out[0].marks == ("x",) and out[1].model_version is None
    back = decode_batch(encode_batch(Batch("gw", 1, Kind.FRAME, out))).records
    assert [f.key for f in back] == ["m1-1", "m1-2"]


def test_frame_missing_a_model_feature_is_kept_unscored(tmp_path):
    path, mpath, _ = export(tmp_path)
    slot = ModelSlot()
    slot.swap(load_model(path, mpath))
    good = pending(1, dict.fromkeys(FEATURES, 1.0))
    partial = pending(2, {FEATURES[0]: 1.0})
    a, b = slot.score([good, partial])
    assert a.prediction is not None and b.prediction is None and b.model_version is None
    assert slot.unscored == 1


def test_empty_slot_passes_frames_through_unscored():
    (f,) = ModelSlot().score([pending(1, {"a_mean": 1.0})])
    assert f.prediction is None and f.features == {"a_mean": 1.0}


def test_swap_keeps_the_previous_model_for_rollback(tmp_path):
    p1, m1, _ = export(tmp_path, version=1, name="q1")
    p2, m2, _ = export(tmp_path, version=2, name="q2", seed=5)
    slot = ModelSlot()
    assert slot.swap(load_model(p1, m1)) is None
    old = slot.swap(load_model(p2, m2))
    assert old is not None and old.version == 1 and slot.current.version == 2
    assert slot.rollback().version == 1 and slot.previous.version == 2
    with pytest.raises(RuntimeError, match="no previous"):
        ModelSlot().rollback()


def test_corrupt_model_file_is_refused_by_checksum(tmp_path):
    path, mpath, _ = export(tmp_path)
    path.write_bytes(path.read_bytes()[:-20] + b"\0" * 20)
    with pytest.raises(ModelLoadError, match=r"sha256 .* does not match the manifest"):
        load_model(path, mpath)


def test_garbage_with_a_matching_checksum_is_refused_by_onnxruntime(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"this is not an onnx model")
    mpath = tmp_path / "m.manifest.json"
    mpath.write_bytes(
        ModelManifest("m", 1, ("a_mean",), "label", sha256_hex(path.read_bytes()), 0).to_json()
    )
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load it"):
        load_model(path, mpath)


def test_model_with_the_wrong_number_of_inputs_names_the_expectation(tmp_path):
    path, mpath, _ = export(tmp_path, n_inputs=5)  # manifest says 5 features, model takes 3
    with pytest.raises(ModelLoadError, match=r"shape \[None, 3\].*expected \[batch, 5\]"):
        load_model(path, mpath)


def test_missing_or_malformed_manifest(tmp_path):
    path, mpath, _ = export(tmp_path)
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(path, tmp_path / "nope.json")
    mpath.write_text('{"name": "x"}')
    with pytest.raises(ModelLoadError, match=r"manifest .* incomplete"):
        load_model(path, mpath)
