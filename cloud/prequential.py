"""Prequential (test-then-train) metrics, overall and over a rolling window.

Written for the learning hot path: one ``update`` per labelled sample does a handful of float
operations and a deque append, and the rolling sums are kept incrementally (no re-scan, no
``revert``). Classification: accuracy, F1 of the positive class, log loss. Regression: MAE, RMSE.
Everything here pickles, so metric state survives a restart inside the learner checkpoint.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

__all__ = ["ClassificationMetrics", "PrequentialMetrics", "RegressionMetrics", "RollingMean"]

_EPS = 1e-15


class RollingMean:
    """Mean of the last ``window`` values, O(1) per update."""

    __slots__ = ("_sum", "_values", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self._values: deque[float] = deque()
        self._sum = 0.0

    def update(self, value: float) -> None:
        self._values.append(value)
        self._sum += value
        if len(self._values) > self.window:
            self._sum -= self._values.popleft()

    def __len__(self) -> int:
        return len(self._values)

    @property
    def full(self) -> bool:
        return len(self._values) >= self.window

    def get(self) -> float | None:
        return self._sum / len(self._values) if self._values else None

    def reset(self) -> None:
        self._values.clear()
        self._sum = 0.0


class _Sums:
    """Additive sums of one metric family (so a window is overall minus what fell out of it)."""

    __slots__ = ("v",)

    def __init__(self, width: int) -> None:
        self.v = [0.0] * width

    def add(self, row: tuple[float, ...], sign: float = 1.0) -> None:
        v = self.v
        for i, x in enumerate(row):
            v[i] += sign * x


class PrequentialMetrics:
    """Overall and rolling figures of one model's predictions; subclasses say which."""

    width = 0
    primary = ""
    higher_is_better = True

    def __init__(self, window: int) -> None:
        self.window = window
        self.n = 0
        self._overall = _Sums(self.width)
        self._rolling = _Sums(self.width)
        self._rows: deque[tuple[float, ...]] = deque()

    def _push(self, row: tuple[float, ...]) -> None:
        self.n += 1
        self._overall.add(row)
        self._rolling.add(row)
        self._rows.append(row)
        if len(self._rows) > self.window:
            self._rolling.add(self._rows.popleft(), -1.0)

    def _figures(self, sums: list[float], n: int) -> dict[str, float]:
        raise NotImplementedError

    def overall(self) -> dict[str, float]:
        return self._figures(self._overall.v, self.n) if self.n else {}

    def rolling(self) -> dict[str, float]:
        return self._figures(self._rolling.v, len(self._rows)) if self._rows else {}

    def report(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "overall": self.overall(),
            "rolling": self.rolling(),
            "window": self.window,
        }


class ClassificationMetrics(PrequentialMetrics):
    """Accuracy, F1 of ``positive`` (macro-free, binary) and log loss of the true class."""

    # row: correct, logloss, true positive, false positive, false negative
    width = 5
    primary = "accuracy"
    higher_is_better = True

    def __init__(self, window: int, positive: object = True) -> None:
        super().__init__(window)
        self.positive = positive

    def update(self, y_true: object, y_pred: object, proba: dict[Any, float] | None) -> bool:
        """Record one sample; returns whether the prediction was right."""
        correct = y_pred == y_true
        if proba:
            p = proba.get(y_true, 0.0)
            logloss = -math.log(min(max(p, _EPS), 1.0 - _EPS))
        else:
            logloss = -math.log(1.0 - _EPS) if correct else -math.log(_EPS)
        pos = self.positive
        t_pos, p_pos = y_true == pos, y_pred == pos
        self._push(
            (
                1.0 if correct else 0.0,
                logloss,
                1.0 if t_pos and p_pos else 0.0,
                1.0 if p_pos and not t_pos else 0.0,
                1.0 if t_pos and not p_pos else 0.0,
            )
        )
        return bool(correct)

    def _figures(self, s: list[float], n: int) -> dict[str, float]:
        tp, fp, fn = s[2], s[3], s[4]
        denom = 2 * tp + fp + fn
        return {
            "accuracy": s[0] / n,
            "f1": (2 * tp / denom) if denom else 0.0,
            "log_loss": s[1] / n,
        }


class RegressionMetrics(PrequentialMetrics):
    """Mean absolute error and root mean squared error."""

    width = 2
    primary = "mae"
    higher_is_better = False

    def update(self, y_true: float, y_pred: float) -> float:
        """Record one sample; returns the absolute error."""
        err = abs(float(y_true) - float(y_pred))
        if math.isnan(err) or math.isinf(err):
            err = 1e300
        self._push((err, err * err))
        return err

    def _figures(self, s: list[float], n: int) -> dict[str, float]:
        return {"mae": s[0] / n, "rmse": math.sqrt(s[1] / n)}
