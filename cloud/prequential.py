"""Prequential (test-then-train) metrics, overall and over a rolling window.

Written for the learning hot path: one sample costs a handful of float operations and a deque
append; the rolling window is summed only when it is read (no ``revert``, no drift of running
sums). Classification: accuracy, F1 of the positive class, log loss. Regression: MAE, RMSE.
Everything here pickles, so metric state survives a restart inside the learner checkpoint.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

__all__ = ["ClassificationMetrics", "PrequentialMetrics", "RegressionMetrics", "RollingMean"]

_EPS = 1e-15
_ONE_MINUS_EPS = 1.0 - _EPS
_LOGLOSS_RIGHT = -math.log(_ONE_MINUS_EPS)
_LOGLOSS_WRONG = -math.log(_EPS)


class RollingMean:
    """Mean of the last ``window`` values, O(1) per update (or per batch, with :meth:`extend`)."""

    __slots__ = ("_sum", "_values", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self._values: deque[float] = deque(maxlen=window)
        self._sum = 0.0

    def update(self, value: float) -> None:
        values = self._values
        if len(values) >= self.window:
            self._sum -= values[0]
        values.append(value)
        self._sum += value

    def extend(self, values: list[float]) -> None:
        """:meth:`update` with every value, in order; the window is re-summed exactly."""
        if len(values) == 1:
            self.update(values[0])
            return
        self._values.extend(values)
        self._sum = math.fsum(self._values)

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

    def __getstate__(self) -> dict[str, Any]:
        return {"window": self.window, "_values": list(self._values), "_sum": self._sum}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):  # the default slots pickle of older checkpoints
            state = state[1]
        self.window = state["window"]
        self._values = deque(state["_values"], maxlen=self.window)
        self._sum = math.fsum(self._values)


class _Sums:
    """Kept so checkpoints written before the lazy rolling window still load."""

    __slots__ = ("v",)

    def __init__(self, width: int) -> None:
        self.v = [0.0] * width


class PrequentialMetrics:
    """Overall and rolling figures of one model's predictions; subclasses say which.

    A sample is first turned into a ``row`` of additive terms (once, even when it is pushed into
    several metric sets, e.g. the model's and its asset's), then :meth:`push`-ed: the overall
    sums grow by the row and the row goes into a bounded deque. The rolling figures are summed
    from that deque when read (reports, snapshots, evidence: rare), not on every sample.
    """

    width = 0
    primary = ""
    higher_is_better = True

    def __init__(self, window: int) -> None:
        self.window = window
        self.n = 0
        self._overall = [0.0] * self.width
        self._rows: deque[tuple[float, ...]] = deque(maxlen=window)

    def push(self, row: tuple[float, ...]) -> None:
        self.n += 1
        o = self._overall
        for i, x in enumerate(row):
            o[i] += x
        self._rows.append(row)

    def extend(self, rows: list[tuple[float, ...]]) -> None:
        """:meth:`push` every row, in order (sums per column in C)."""
        if not rows:
            return
        self.n += len(rows)
        o = self._overall
        for i, col in enumerate(zip(*rows, strict=True)):
            o[i] += math.fsum(col)
        self._rows.extend(rows)

    def _figures(self, sums: list[float], n: int) -> dict[str, float]:
        raise NotImplementedError

    def overall(self) -> dict[str, float]:
        return self._figures(self._overall, self.n) if self.n else {}

    def rolling(self) -> dict[str, float]:
        rows = self._rows
        if not rows:
            return {}
        return self._figures([math.fsum(col) for col in zip(*rows, strict=True)], len(rows))

    def report(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "overall": self.overall(),
            "rolling": self.rolling(),
            "window": self.window,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        overall = state.get("_overall")
        if isinstance(overall, _Sums):  # a checkpoint from before the lazy rolling window
            state["_overall"] = list(overall.v)
            state.pop("_rolling", None)
        state["_rows"] = deque(state.get("_rows", ()), maxlen=state["window"])
        self.__dict__.update(state)


class ClassificationMetrics(PrequentialMetrics):
    """Accuracy, F1 of ``positive`` (macro-free, binary) and log loss of the true class."""

    # row: correct, logloss, true positive, false positive, false negative
    width = 5
    primary = "accuracy"
    higher_is_better = True

    def __init__(self, window: int, positive: object = True) -> None:
        super().__init__(window)
        self.positive = positive

    def row(
        self, y_true: object, y_pred: object, proba: dict[Any, float] | None
    ) -> tuple[float, float, float, float, float]:
        """The additive terms of one sample; ``row[0]`` is 1.0 when the prediction was right."""
        correct = y_pred == y_true
        if proba:
            p = proba.get(y_true, 0.0)
            logloss = -math.log(min(max(p, _EPS), _ONE_MINUS_EPS))
        else:
            logloss = _LOGLOSS_RIGHT if correct else _LOGLOSS_WRONG
        pos = self.positive
        t_pos = y_true == pos
        p_pos = y_pred == pos
        return (
            1.0 if correct else 0.0,
            logloss,
            1.0 if t_pos and p_pos else 0.0,
            1.0 if p_pos and not t_pos else 0.0,
            1.0 if t_pos and not p_pos else 0.0,
        )

    def push(self, row: tuple[float, ...]) -> None:
        self.n += 1
        o = self._overall
        o[0] += row[0]
        o[1] += row[1]
        o[2] += row[2]
        o[3] += row[3]
        o[4] += row[4]
        self._rows.append(row)

    def rows(
        self, ys: list[Any], preds: list[Any], p_true: list[float | None]
    ) -> tuple[list[tuple[float, ...]], list[float]]:
        """:meth:`row` of many samples at once, column by column; also returns column 0.

        ``p_true[i]`` is the probability given to the true class (``None`` when the model gave
        no probabilities: the log loss is then that of a hard right or wrong answer)."""
        correct = [1.0 if p == y else 0.0 for p, y in zip(preds, ys, strict=True)]
        logloss = [
            (_LOGLOSS_RIGHT if c else _LOGLOSS_WRONG)
            if p is None
            else -math.log(min(max(p, _EPS), _ONE_MINUS_EPS))
            for p, c in zip(p_true, correct, strict=True)
        ]
        pos = self.positive
        t_pos = [y == pos for y in ys]
        p_pos = [p == pos for p in preds]
        tp = [1.0 if t and p else 0.0 for t, p in zip(t_pos, p_pos, strict=True)]
        fp = [1.0 if p and not t else 0.0 for t, p in zip(t_pos, p_pos, strict=True)]
        fn = [1.0 if t and not p else 0.0 for t, p in zip(t_pos, p_pos, strict=True)]
        return list(zip(correct, logloss, tp, fp, fn, strict=True)), correct

    def update(self, y_true: object, y_pred: object, proba: dict[Any, float] | None) -> bool:
        """Record one sample; returns whether the prediction was right."""
        row = self.row(y_true, y_pred, proba)
        self.push(row)
        return row[0] == 1.0

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

    @staticmethod
    def row(y_true: float, y_pred: float) -> tuple[float, float]:
        """The additive terms of one sample; ``row[0]`` is the absolute error."""
        err = abs(float(y_true) - float(y_pred))
        if math.isnan(err) or math.isinf(err):
            err = 1e300
        return (err, err * err)

    def push(self, row: tuple[float, ...]) -> None:
        self.n += 1
        o = self._overall
        o[0] += row[0]
        o[1] += row[1]
        self._rows.append(row)

    def update(self, y_true: float, y_pred: float) -> float:
        """Record one sample; returns the absolute error."""
        row = self.row(y_true, y_pred)
        self.push(row)
        return row[0]

    def _figures(self, s: list[float], n: int) -> dict[str, float]:
        return {"mae": s[0] / n, "rmse": math.sqrt(s[1] / n)}
