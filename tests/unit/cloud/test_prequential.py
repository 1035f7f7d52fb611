"""Prequential metrics: overall and rolling figures, batched folding, pickling."""

from __future__ import annotations

import math
import pickle

import pytest

from cloud.config import ModelConfig
from cloud.learning import Candidate, _Scored
from cloud.prequential import ClassificationMetrics, RegressionMetrics, RollingMean


def test_classification_figures_overall_and_over_the_window():
    m = ClassificationMetrics(window=2)
    m.update(1, 1, {1: 0.8, 0: 0.2})  # right
    m.update(0, 1, {1: 0.6, 0: 0.4})  # false positive
    m.update(1, 0, None)  # false negative, no probabilities
    o = m.overall()
    assert o["accuracy"] == pytest.approx(1 / 3)
    assert o["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    expected_ll = (-math.log(0.8) - math.log(0.4) - math.log(1e-15)) / 3
    assert o["log_loss"] == pytest.approx(expected_ll)
    r = m.rolling()  # the last two only
    assert r["accuracy"] == 0.0 and r["f1"] == 0.0
    assert m.report()["n"] == 3 and m.report()["window"] == 2


def test_regression_figures_and_non_finite_predictions():
    m = RegressionMetrics(window=2)
    assert m.update(3.0, 1.0) == 2.0
    m.update(0.0, 4.0)
    m.update(1.0, 1.0)
    assert m.overall() == {"mae": 2.0, "rmse": pytest.approx(math.sqrt(20 / 3))}
    assert m.rolling() == {"mae": 2.0, "rmse": pytest.approx(math.sqrt(8))}
    assert m.update(1.0, math.inf) == 1e300  # counted as a huge error, not NaN
    assert m.rolling()["mae"] > 1e299


def test_rolling_mean_of_the_promotion_window():
    r = RollingMean(3)
    assert r.get() is None and not r.full
    for v in (1.0, 0.0, 1.0, 1.0):
        r.update(v)
    assert r.full and len(r) == 3 and r.get() == pytest.approx(2 / 3)


def test_scored_folds_queued_samples_before_any_read_and_per_asset():
    s = _Scored("classification", window=500, promo_window=10, max_assets=2)
    for i in range(300):  # more than one fold, several assets, one beyond max_assets
        asset = ("a", "b", "c")[i % 3]
        s.score(asset, 1, 1 if i % 4 else 0, None)
    assert s.metrics.n == 300
    assert s.metrics.overall()["accuracy"] == pytest.approx(225 / 300)
    assert set(s.per_asset) == {"a", "b", "*other*"}
    assert sum(m.n for m in s.per_asset.values()) == 300
    assert s.promo.get() == pytest.approx(sum(1 for i in range(290, 300) if i % 4) / 10)


def test_a_candidate_predicts_before_it_learns_and_pickles_with_its_metrics():
    cand = Candidate(ModelConfig().effective_learners()[0], ModelConfig(), promo_window=50)
    # an untrained model is scored on the first sample before learning from it
    cand.learn("press-1", {"t": 1.0}, 1)
    assert cand.metrics.n == 1 and cand.n_learned == 1
    for i in range(200):
        x = float(i % 7 - 3)
        cand.learn("press-1", {"t": x}, int(x > 0))
    back = pickle.loads(pickle.dumps(cand))
    assert back.metrics.overall() == cand.metrics.overall()
    assert back.metrics.rolling() == cand.metrics.rolling()
    assert back.metrics.rolling()["accuracy"] > 0.9
    assert list(back.features) == ["t"]


def test_rolling_mean_extend_equals_update_and_survives_a_pickle():
    one, many = RollingMean(5), RollingMean(5)
    values = [0.5, 1.0, 0.0, 2.0, 1.5, 0.25, 3.0, 1.0]
    for v in values:
        one.update(v)
    many.extend(values[:3])
    many.extend(values[3:])
    assert len(many) == len(one) == 5 and many.get() == pytest.approx(one.get())
    back = pickle.loads(pickle.dumps(many))
    assert back.full and back.get() == pytest.approx(one.get())
    back.update(10.0)
    one.update(10.0)
    assert back.get() == pytest.approx(one.get())
    # the state older checkpoints hold (default slots pickle, unbounded deque)
    old = RollingMean.__new__(RollingMean)
    old.__setstate__((None, {"window": 3, "_values": [1.0, 0.0, 1.0], "_sum": 2.0}))
    old.update(1.0)
    assert len(old) == 3 and old.get() == pytest.approx(2 / 3)
