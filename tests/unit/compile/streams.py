"""Streams and pipelines shared by the compiler tests and bench/bench_compile.py."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

from river import forest, linear_model, preprocessing, tree
from river.datasets import synth

Sample = tuple[dict[str, float], Any]


def classification_streams() -> dict[str, Callable[[], Iterator[Sample]]]:
    return {
        "agrawal": lambda: iter(synth.Agrawal(classification_function=2, seed=11)),
        "sea": lambda: iter(synth.SEA(variant=1, seed=12)),
        "hyperplane": lambda: iter(
            synth.Hyperplane(seed=13, n_features=6, n_drift_features=2, mag_change=0.05)
        ),
        # abrupt-ish concept drift in the middle of the learning window
        "sea-drift": lambda: iter(
            synth.ConceptDriftStream(
                stream=synth.SEA(variant=0, seed=14),
                drift_stream=synth.SEA(variant=3, seed=15),
                position=900,
                width=200,
                seed=16,
            )
        ),
    }


def regression_streams() -> dict[str, Callable[[], Iterator[Sample]]]:
    return {
        "friedman": lambda: iter(synth.Friedman(seed=21)),
        "friedman-drift": lambda: iter(
            synth.FriedmanDrift(drift_type="gra", position=(600, 1200), seed=22)
        ),
        "planes2d": lambda: iter(synth.Planes2D(seed=23)),
    }


def classifiers() -> dict[str, Callable[[], Any]]:
    return {
        "logreg": lambda: linear_model.LogisticRegression(),
        "scaler|logreg": lambda: preprocessing.StandardScaler() | linear_model.LogisticRegression(),
        "htc-mc": lambda: tree.HoeffdingTreeClassifier(
            grace_period=50, delta=1e-3, leaf_prediction="mc"
        ),
        "htc-nb": lambda: tree.HoeffdingTreeClassifier(
            grace_period=50, delta=1e-3, leaf_prediction="nb"
        ),
        "htc-nba": lambda: tree.HoeffdingTreeClassifier(grace_period=50, delta=1e-3),
        "scaler|htc-nba": lambda: (
            preprocessing.StandardScaler()
            | tree.HoeffdingTreeClassifier(grace_period=50, delta=1e-3)
        ),
        "arf-nba": lambda: forest.ARFClassifier(n_models=3, grace_period=50, seed=1),
        "arf-mc": lambda: forest.ARFClassifier(
            n_models=3, grace_period=50, delta=1e-3, leaf_prediction="mc", seed=2
        ),
    }


def regressors() -> dict[str, Callable[[], Any]]:
    return {
        "linreg": lambda: linear_model.LinearRegression(),
        "scaler|linreg": lambda: preprocessing.StandardScaler() | linear_model.LinearRegression(),
        "htr-mean": lambda: tree.HoeffdingTreeRegressor(
            grace_period=50, delta=1e-3, leaf_prediction="mean"
        ),
        "htr-model": lambda: tree.HoeffdingTreeRegressor(
            grace_period=50, delta=1e-3, leaf_prediction="model"
        ),
        "htr-adaptive": lambda: tree.HoeffdingTreeRegressor(grace_period=50, delta=1e-3),
        "scaler|htr-adaptive": lambda: (
            preprocessing.StandardScaler()
            | tree.HoeffdingTreeRegressor(grace_period=50, delta=1e-3)
        ),
        "arfr-median": lambda: forest.ARFRegressor(n_models=3, grace_period=50, seed=3),
        "arfr-mean": lambda: forest.ARFRegressor(
            n_models=4,
            grace_period=50,
            aggregation_method="mean",
            disable_weighted_vote=False,
            seed=4,
        ),
    }


def learn(
    model: Any, stream: Iterator[Sample], n_learn: int, n_held: int
) -> tuple[list[str], list[dict[str, float]]]:
    """Learn ``n_learn`` samples online (predict-then-learn, as the cloud does), return the
    feature list and ``n_held`` held-out frames."""
    data = list(itertools.islice(stream, n_learn + n_held))
    features = sorted(data[0][0])
    for x, y in data[:n_learn]:
        model.predict_one(x)
        model.learn_one(x, y)
    return features, [dict(x) for x, _ in data[n_learn:]]


def with_missing(frames: list[dict[str, float]], rate: float, seed: int) -> list[dict[str, float]]:
    """Copies of ``frames`` with about ``rate`` of the values dropped (absent keys)."""
    rng = random.Random(seed)
    return [{k: v for k, v in f.items() if rng.random() >= rate} for f in frames]
