"""Online learning: candidates learning side by side, the deployed champion, drift, promotion.

For every joined (frame, label) each :class:`Candidate` predicts first and then learns
(prequential evaluation). The :class:`Champion` is a frozen copy of the version the edge runs:
it is only scored, never trained, and its errors — taken from the edge's own predictions when
frames carry them for that version, else from the frozen copy — feed the drift detector.
:class:`ModelLearner` ties one configured model together and pickles as a whole: that pickle is
the learner checkpoint.
"""

from __future__ import annotations

import bisect
import fnmatch
import importlib
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cloud.config import DriftConfig, LearnerConfig, ModelConfig, PromotionConfig, Step
from cloud.drift import DriftDetection, DriftMonitor
from cloud.prequential import (
    ClassificationMetrics,
    PrequentialMetrics,
    RegressionMetrics,
    RollingMean,
)
from shared.records import Frame, now_ns

__all__ = [
    "Candidate",
    "Champion",
    "ModelLearner",
    "PromotionDecision",
    "build_pipeline",
    "resolve_step",
]

OTHER_ASSETS = "*other*"
#: samples queued before the overall / rolling / per-asset metrics are folded
_FOLD = 256


def resolve_step(step: Step) -> tuple[type, dict[str, Any]]:
    """``"linear_model.LogisticRegression"`` or ``{name: params}`` -> (river class, params).

    Only classes inside the ``river`` package are accepted (a config file cannot name arbitrary
    code); raises ``ValueError`` naming the step and what was expected.
    """
    if isinstance(step, str):
        name, params = step, {}
    elif isinstance(step, dict) and len(step) == 1:
        name, raw = next(iter(step.items()))
        params = dict(raw or {})
    else:
        raise ValueError(f"expected 'module.Class' or {{'module.Class': {{params}}}}, got {step!r}")
    module_name, _, cls_name = name.rpartition(".")
    if not module_name or not cls_name or cls_name.startswith("_"):
        raise ValueError(
            f"expected 'module.Class' inside river (e.g. tree.HoeffdingTreeClassifier), got {name!r}"
        )
    try:
        module = importlib.import_module(f"river.{module_name}")
    except ModuleNotFoundError:
        raise ValueError(f"river has no module {module_name!r} (step {name!r})") from None
    cls = getattr(module, cls_name, None)
    if not isinstance(cls, type):
        raise ValueError(f"river.{module_name} has no class {cls_name!r}")
    return cls, params


def build_pipeline(steps: list[Step]) -> Any:
    """Instantiate and chain the river estimators of ``steps`` (``a | b | c``)."""
    pipeline: Any = None
    for step in steps:
        cls, params = resolve_step(step)
        try:
            est = cls(**params)
        except TypeError as exc:
            raise ValueError(f"{cls.__module__}.{cls.__name__}: {exc}") from None
        pipeline = est if pipeline is None else pipeline | est
    return pipeline


def _new_metrics(task: str, window: int) -> PrequentialMetrics:
    return ClassificationMetrics(window) if task == "classification" else RegressionMetrics(window)


def normalise_target(task: str, target: float | int | bool) -> Any:
    """Classes are compared by value: 1.0, 1 and True are the same class."""
    if task == "classification":
        if isinstance(target, float) and target.is_integer():
            return int(target)
        return target
    return float(target)


def _top_class(proba: Mapping[Any, float]) -> Any:
    """The most probable class, or None for an empty distribution (a model yet untrained)."""
    return max(proba, key=proba.__getitem__) if proba else None


class _Scored:
    """Prequential metrics of one model, overall and per asset, plus its promotion window.

    The promotion window is updated with every sample (the policy reads it after each one);
    the overall, rolling and per-asset figures are folded in batches: a sample's row of additive
    terms is computed once and queued, and the queue is folded (C-level sums, deque extends)
    every ``_FOLD`` samples and before anything reads :attr:`metrics` or :attr:`per_asset`.
    """

    def __init__(self, task: str, window: int, promo_window: int, max_assets: int) -> None:
        self.task = task
        self.window = window
        self.max_assets = max_assets
        self._metrics = _new_metrics(task, window)
        self._per_asset: dict[str, PrequentialMetrics] = {}
        self._pending_assets: list[str] = []
        self._pending_rows: list[tuple[float, ...]] = []
        #: the primary figure (1 = right / absolute error) over the promotion window
        self.promo = RollingMean(promo_window)

    @property
    def metrics(self) -> PrequentialMetrics:
        if self._pending_rows:
            self._fold()
        return self._metrics

    @property
    def per_asset(self) -> dict[str, PrequentialMetrics]:
        if self._pending_rows:
            self._fold()
        return self._per_asset

    def _asset(self, asset: str) -> PrequentialMetrics:
        m = self._per_asset.get(asset)
        if m is None:
            if len(self._per_asset) >= self.max_assets:
                asset = OTHER_ASSETS
                m = self._per_asset.get(asset)
            if m is None:
                m = self._per_asset[asset] = _new_metrics(self.task, self.window)
        return m

    def _fold(self, keep_last: int = 0) -> None:
        """Fold the queued rows, all but the newest ``keep_last`` (a drift detection in the
        middle of a batch reads the figures as they were at its sample)."""
        rows, assets = self._pending_rows, self._pending_assets
        if keep_last:
            cut = len(rows) - keep_last
            if cut <= 0:
                return
            rows, self._pending_rows = rows[:cut], rows[cut:]
            assets, self._pending_assets = assets[:cut], assets[cut:]
        else:
            self._pending_rows, self._pending_assets = [], []
        self._metrics.extend(rows)
        first = assets[0]
        if assets.count(first) == len(assets):  # the usual case: one batch, one asset
            self._asset(first).extend(rows)
            return
        by_asset: dict[str, list[tuple[float, ...]]] = {}
        for asset, row in zip(assets, rows, strict=True):
            group = by_asset.get(asset)
            if group is None:
                by_asset[asset] = [row]
            else:
                group.append(row)
        for asset, group in by_asset.items():
            self._asset(asset).extend(group)

    def score(self, asset: str, y: Any, y_pred: Any, proba: dict[Any, float] | None) -> float:
        """Record one prediction; returns the error (0/1 or absolute)."""
        metrics = self._metrics
        if self.task == "classification":
            assert isinstance(metrics, ClassificationMetrics)
            row: tuple[float, ...] = metrics.row(y, y_pred, proba)
            err = 1.0 - row[0]
            self.promo.update(row[0])
        else:
            assert isinstance(metrics, RegressionMetrics)
            row = metrics.row(y, 0.0 if y_pred is None else y_pred)
            err = row[0]
            self.promo.update(err)
        rows = self._pending_rows
        rows.append(row)
        self._pending_assets.append(asset)
        if len(rows) >= _FOLD:
            self._fold()
        return err

    def score_many(
        self,
        assets: str | list[str],
        ys: list[Any],
        preds: list[Any],
        p_true: list[float | None] | None = None,
    ) -> list[float]:
        """:meth:`score` many samples in order (``assets``: one per sample, or one for all);
        classification takes the probability of the true class, not the whole distribution.
        Returns the errors."""
        metrics = self._metrics
        if self.task == "classification":
            assert isinstance(metrics, ClassificationMetrics)
            if p_true is None:
                p_true = [None] * len(ys)
            rows, correct = metrics.rows(ys, preds, p_true)
            self.promo.extend(correct)
            errors = [1.0 - c for c in correct]
        else:
            assert isinstance(metrics, RegressionMetrics)
            rows = [metrics.row(y, 0.0 if p is None else p) for y, p in zip(ys, preds, strict=True)]
            errors = [r[0] for r in rows]
            self.promo.extend(errors)
        self._pending_rows.extend(rows)
        if isinstance(assets, str):
            self._pending_assets.extend([assets] * len(rows))
        else:
            self._pending_assets.extend(assets)
        if len(self._pending_rows) >= _FOLD:
            self._fold()
        return errors

    def report(self, *, assets: bool = True) -> dict[str, Any]:
        out = self.metrics.report()
        if assets:
            out["assets"] = {a: m.report() for a, m in self.per_asset.items()}
        return out

    def __getstate__(self) -> dict[str, Any]:
        if self._pending_rows:
            self._fold()
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "metrics" in state:  # a checkpoint from before batched folding
            state["_metrics"] = state.pop("metrics")
            state["_per_asset"] = state.pop("per_asset")
        state.setdefault("_pending_rows", [])
        state.setdefault("_pending_assets", [])
        self.__dict__.update(state)


class Candidate(_Scored):
    """A river pipeline that predicts, then learns, every joined sample."""

    def __init__(self, spec: LearnerConfig, model: ModelConfig, promo_window: int) -> None:
        super().__init__(model.task, model.rolling_window, promo_window, model.max_assets)
        self.name = spec.name
        self.steps = list(spec.pipeline)
        self.pipeline = build_pipeline(self.steps)
        self.n_learned = 0
        self.features: dict[str, None] = {}

    def learn_many(
        self, assets: str | list[str], xs: list[dict[str, float]], ys: list[Any]
    ) -> None:
        """:meth:`learn` every sample in order: predict sample i, learn sample i, then i + 1.

        Only the river calls run per sample; the metrics of the whole run are computed column
        by column afterwards (same figures as sample by sample)."""
        pipeline = self.pipeline
        preds: list[Any] = []
        learn_one = pipeline.learn_one
        if self.task == "classification":
            p_true: list[float | None] = []
            predict_proba_one = pipeline.predict_proba_one
            for x, y in zip(xs, ys, strict=True):
                proba = predict_proba_one(x)
                preds.append(_top_class(proba))
                p_true.append(proba.get(y, 0.0) if proba else None)
                learn_one(x, y)
            self.score_many(assets, ys, preds, p_true)
        else:
            predict_one = pipeline.predict_one
            for x, y in zip(xs, ys, strict=True):
                preds.append(predict_one(x))
                learn_one(x, y)
            self.score_many(assets, ys, preds)
        self.n_learned += len(xs)
        features = self.features
        keys = features.keys()
        for x in xs:
            if not keys >= x.keys():
                for k in x:
                    features.setdefault(k)

    def learn(self, asset: str, x: dict[str, float], y: Any) -> float:
        pipeline = self.pipeline
        if self.task == "classification":
            proba = pipeline.predict_proba_one(x)
            y_pred = _top_class(proba)
            err = self.score(asset, y, y_pred, proba)
        else:
            err = self.score(asset, y, pipeline.predict_one(x), None)
        pipeline.learn_one(x, y)
        self.n_learned += 1
        features = self.features
        if not features.keys() >= x.keys():
            for k in x:
                features.setdefault(k)
        return err


class Champion(_Scored):
    """The version deployed at the edge: a frozen pipeline, scored in the cloud and at the edge."""

    def __init__(
        self,
        version: int,
        learner: str,
        pipeline: Any,
        model: ModelConfig,
        promo_window: int,
        since_sample: int,
    ) -> None:
        super().__init__(model.task, model.rolling_window, promo_window, model.max_assets)
        self.version = version
        self.learner = learner
        self.pipeline = pipeline
        self.since_sample = since_sample
        #: what the edge itself predicted with this version (frames carry it)
        self.edge = _Scored(model.task, model.rolling_window, promo_window, model.max_assets)

    def score_cloud(self, asset: str, x: dict[str, float], y: Any) -> float:
        if self.pipeline is None:
            return math.nan
        if self.task == "classification":
            proba = self.pipeline.predict_proba_one(x)
            y_pred = _top_class(proba)
            return self.score(asset, y, y_pred, proba)
        return self.score(asset, y, self.pipeline.predict_one(x), None)

    def score_cloud_many(
        self, assets: str | list[str], xs: list[Any], ys: list[Any]
    ) -> list[float]:
        """:meth:`score_cloud` of many samples (NaN errors when there is no frozen copy)."""
        pipeline = self.pipeline
        if pipeline is None:
            return [math.nan] * len(xs)
        if self.task == "classification":
            preds: list[Any] = []
            p_true: list[float | None] = []
            predict_proba_one = pipeline.predict_proba_one
            for x, y in zip(xs, ys, strict=True):
                proba = predict_proba_one(x)
                preds.append(_top_class(proba))
                p_true.append(proba.get(y, 0.0) if proba else None)
            return self.score_many(assets, ys, preds, p_true)
        return self.score_many(assets, ys, [pipeline.predict_one(x) for x in xs])

    def score_edge_many(
        self, assets: str | list[str], frames: list[Frame], ys: list[Any]
    ) -> list[float]:
        """:meth:`score_edge` of many frames."""
        if self.task != "classification":
            return self.edge.score_many(assets, ys, [f.prediction for f in frames])
        preds = [
            None if f.prediction is None else normalise_target("classification", f.prediction)
            for f in frames
        ]
        p_true: list[float | None] = [None] * len(frames)
        for i, (f, y) in enumerate(zip(frames, ys, strict=True)):
            if f.score is not None and isinstance(y, int) and y in (0, 1):
                p1 = min(max(float(f.score), 0.0), 1.0)
                p_true[i] = p1 if y == 1 else 1.0 - p1
        return self.edge.score_many(assets, ys, preds, p_true)

    def score_edge(self, asset: str, frame: Frame, y: Any) -> float:
        pred: Any = frame.prediction
        if self.task == "classification":
            pred = normalise_target("classification", pred) if pred is not None else None
            proba = None
            if frame.score is not None and isinstance(y, int) and y in (0, 1):
                p1 = min(max(float(frame.score), 0.0), 1.0)
                proba = {1: p1, 0: 1.0 - p1}
            return self.edge.score(asset, y, pred, proba)
        return self.edge.score(asset, y, pred, None)

    def report(self, *, assets: bool = True) -> dict[str, Any]:
        return {
            "version": self.version,
            "learner": self.learner,
            "cloud": super().report(assets=assets),
            "edge": self.edge.report(assets=assets),
        }


@dataclass(slots=True)
class PromotionDecision:
    """The policy chose a challenger to replace the champion; what it saw is in ``evidence``."""

    model: str
    learner: str
    reason: str  # initial | margin | drift | manual
    evidence: dict[str, Any]
    pipeline_blob: bytes
    metrics: dict[str, Any]
    features: list[str]
    steps: list[Any]
    ts_ns: int = field(default_factory=now_ns)


class ModelLearner:
    """One configured model: its candidates, its champion, its drift monitor, its policy state."""

    def __init__(self, model: ModelConfig, drift: DriftConfig, promotion: PromotionConfig) -> None:
        self.config = model
        self.drift_config = drift
        self.promotion = promotion
        self.name = model.name
        self.task = model.task
        self.candidates = {
            spec.name: Candidate(spec, model, promotion.window)
            for spec in model.effective_learners()
        }
        self.champion: Champion | None = None
        self.drift = DriftMonitor(drift)
        self.samples = 0
        #: sample count at the last promotion and at the last unanswered drift
        self.promoted_at: int | None = None
        self.drift_at: int | None = None
        self.drift_pending: DriftDetection | None = None
        self.edge_frames = 0
        self.edge_frames_other_version = 0
        #: a decision was handed to the service and is not installed yet
        self.promotion_pending = False
        #: registry id of the drift detection the next promotion answers
        self.drift_record_id: int | None = None

    def matches(self, asset: str) -> bool:
        return any(fnmatch.fnmatchcase(asset, p) for p in self.config.assets)

    # -- the hot path ------------------------------------------------------------------------

    def learn(self, frame: Frame, target: float | int | bool) -> DriftDetection | None:
        """Predict-then-learn one labelled frame with every candidate; score the champion."""
        detections = self.learn_many([frame], [target])
        return detections[-1] if detections else None

    def learn_many(
        self, frames: list[Frame], targets: list[float | int | bool]
    ) -> list[DriftDetection]:
        """:meth:`learn` every labelled frame, in order; returns the drift detections.

        Each candidate predicts then learns sample after sample (candidates are independent, so
        one runs through the samples, then the next); the champion is frozen, so scoring it
        per run changes nothing; its errors reach the drift detector in sample order, and a
        detection's evidence is read as of its own sample. The policy is the caller's, after
        the run (:meth:`evaluate_promotion`)."""
        n = len(frames)
        if not n:
            return []
        task = self.task
        if task == "classification":
            ys = [
                int(t) if type(t) is float and t.is_integer() else t  # normalise_target
                for t in targets
            ]
        else:
            ys = [float(t) for t in targets]
        xs = [f.features for f in frames]
        asset_list = [f.asset for f in frames]
        assets: str | list[str] = (
            asset_list[0] if asset_list.count(asset_list[0]) == n else asset_list
        )
        start = self.samples
        self.samples += n
        for cand in self.candidates.values():
            cand.learn_many(assets, xs, ys)
        champ = self.champion
        if champ is None:
            return []
        version = champ.version
        src = self.drift_config.source
        # which samples the edge scored with this very version
        edge_idx: list[int] = []
        other = 0
        for i, f in enumerate(frames):
            if f.prediction is not None and f.model_version is not None:
                if f.model_version == version:
                    edge_idx.append(i)
                else:
                    other += 1
        self.edge_frames += len(edge_idx)
        self.edge_frames_other_version += other
        edge_errs: list[float] = []
        if edge_idx:
            if len(edge_idx) == n:
                edge_errs = champ.score_edge_many(assets, frames, ys)
            else:
                edge_errs = champ.score_edge_many(
                    [asset_list[i] for i in edge_idx],
                    [frames[i] for i in edge_idx],
                    [ys[i] for i in edge_idx],
                )
        # the frozen copy is scored where the edge did not score this version itself (the edge
        # runs the same model, so scoring it twice is only work), and always for drift.source
        # "cloud"; each sample is therefore scored for the champion at least once
        if src == "cloud" or not edge_idx:
            cloud_idx = list(range(n))
            cloud_errs = champ.score_cloud_many(assets, xs, ys)
        elif len(edge_idx) < n:
            edge_set = set(edge_idx)
            cloud_idx = [i for i in range(n) if i not in edge_set]
            cloud_errs = champ.score_cloud_many(
                [asset_list[i] for i in cloud_idx],
                [xs[i] for i in cloud_idx],
                [ys[i] for i in cloud_idx],
            )
        else:
            cloud_idx, cloud_errs = [], []
        if not self.drift_config.enabled:
            return []
        # the error stream of the champion, in sample order: (sample index, error, source)
        feed: list[tuple[int, float, str]]
        if src == "edge" or (src == "auto" and len(edge_idx) == n):
            feed = [(i, e, "edge") for i, e in zip(edge_idx, edge_errs, strict=True)]
        elif src == "cloud" or not edge_idx:
            feed = [
                (i, e, "cloud")
                for i, e in zip(cloud_idx, cloud_errs, strict=True)
                if not math.isnan(e)
            ]
        else:  # auto, some samples scored at the edge and some in the cloud
            by_sample = {i: (e, "edge") for i, e in zip(edge_idx, edge_errs, strict=True)}
            for i, e in zip(cloud_idx, cloud_errs, strict=True):
                if not math.isnan(e):
                    by_sample[i] = (e, "cloud")
            feed = [(i, *by_sample[i]) for i in sorted(by_sample)]
        hits = self.drift.update_many([e for _, e, _ in feed])
        detections: list[DriftDetection] = []
        seen_before = self.drift.seen - len(feed)
        for j in hits:
            i, _, source = feed[j]
            scored = champ.edge if source == "edge" else champ
            # the figures as they were at sample i: fold the rows up to it, not beyond
            idx = edge_idx if source == "edge" else cloud_idx
            scored._fold(keep_last=len(idx) - bisect.bisect_right(idx, i))
            metrics = scored._metrics
            det = DriftDetection(
                model=self.name,
                version=version,
                source=source,
                detector=self.drift_config.detector,
                samples=seen_before + j + 1,
                ts_ns=now_ns(),
                evidence={
                    "rolling": metrics.rolling(),
                    "overall": metrics.overall(),
                    "sample": start + i + 1,
                },
            )
            self.drift_at = start + i + 1
            self.drift_pending = det
            detections.append(det)
        return detections

    # -- the promotion policy --------------------------------------------------------------

    def challenger(self) -> Candidate | None:
        """The candidate with the best primary figure over the promotion window."""
        best: Candidate | None = None
        best_val = 0.0
        higher = self.task == "classification"
        for cand in self.candidates.values():
            val = cand.promo.get()
            if val is None:
                continue
            if best is None or (val > best_val if higher else val < best_val):
                best, best_val = cand, val
        return best

    def champion_figure(self) -> tuple[float | None, str, int]:
        """The champion's primary figure over the promotion window: edge when it has a full
        window of its own predictions, else the frozen replica's. (value, source, samples)."""
        champ = self.champion
        if champ is None:
            return None, "none", 0
        if champ.edge.promo.full:
            return champ.edge.promo.get(), "edge", len(champ.edge.promo)
        return champ.promo.get(), "cloud", len(champ.promo)

    def evaluate_promotion(self) -> PromotionDecision | None:
        """Apply the policy now (cheap: called after every sample); a decision is returned,
        not applied — the service registers it and then calls :meth:`install_champion`."""
        policy = self.promotion
        if not policy.enabled or self.promotion_pending:
            return None
        champ = self.champion
        if champ is None:
            # the first champion: the best candidate once it has learned enough
            if self.samples < policy.min_samples:
                return None
            chal = self.challenger()
            if chal is None or chal.n_learned < policy.min_samples:
                return None
            return self._decide(chal, "initial", self._evidence(chal))
        if self.drift_at is not None:
            if self.samples - self.drift_at < policy.min_samples_after_drift:
                return None
            chal = self.challenger()
            if chal is None:
                return None
            # a false alarm must not replace a champion that still does better
            champ_val, _, _ = self.champion_figure()
            chal_val = chal.promo.get()
            if champ_val is not None and chal_val is not None:
                gain = (
                    chal_val - champ_val if self.task == "classification" else champ_val - chal_val
                )
                if gain <= 0:
                    return None
            return self._decide(chal, "drift", self._evidence(chal))
        if (
            self.promoted_at is not None
            and self.samples - self.promoted_at < policy.cooldown_samples
        ):
            return None
        champ_val, _, champ_n = self.champion_figure()
        if champ_val is None or champ_n < policy.window:
            return None
        chal = self.challenger()
        if chal is None or not chal.promo.full:
            return None
        chal_val = chal.promo.get()
        assert chal_val is not None
        gain = chal_val - champ_val if self.task == "classification" else champ_val - chal_val
        if gain > 0 and gain >= policy.margin:
            return self._decide(chal, "margin", self._evidence(chal))
        return None

    def _evidence(self, chal: Candidate) -> dict[str, Any]:
        policy = self.promotion
        chal_val = chal.promo.get()
        evidence: dict[str, Any] = {
            "challenger": chal.name,
            "metric": chal.metrics.primary,
            "higher_is_better": chal.metrics.higher_is_better,
            "challenger_window_value": chal_val,
            "challenger_samples": chal.n_learned,
            "window": policy.window,
            "margin": policy.margin,
            "sample": self.samples,
            "candidates": {
                c.name: {"window_value": c.promo.get(), "n_learned": c.n_learned}
                for c in self.candidates.values()
            },
        }
        if self.champion is not None:
            champ_val, source, champ_n = self.champion_figure()
            evidence.update(
                champion_version=self.champion.version,
                champion_window_value=champ_val,
                champion_source=source,
                champion_samples=champ_n,
            )
            if champ_val is not None and chal_val is not None:
                evidence["gain"] = (
                    chal_val - champ_val if self.task == "classification" else champ_val - chal_val
                )
        if self.drift_pending is not None and self.drift_at is not None:
            evidence["drift"] = {
                "detector": self.drift_pending.detector,
                "source": self.drift_pending.source,
                "at_sample": self.drift_at,
                "samples_since": self.samples - self.drift_at,
                "ts_ns": self.drift_pending.ts_ns,
                "evidence": self.drift_pending.evidence,
            }
        return evidence

    def _decide(self, chal: Candidate, reason: str, evidence: dict[str, Any]) -> PromotionDecision:
        return PromotionDecision(
            model=self.name,
            learner=chal.name,
            reason=reason,
            evidence=evidence,
            pipeline_blob=pickle.dumps(chal.pipeline),
            metrics=chal.report(assets=False),
            features=list(chal.features),
            steps=list(chal.steps),
        )

    def snapshot(self, learner: str) -> PromotionDecision:
        """A manual promotion of the named candidate's current state."""
        cand = self.candidates.get(learner)
        if cand is None:
            raise KeyError(
                f"model {self.name!r} has no learner {learner!r}; have {sorted(self.candidates)}"
            )
        return self._decide(cand, "manual", self._evidence(cand))

    def install_champion(self, version: int, learner: str, pipeline_blob: bytes | None) -> None:
        """Make ``version`` the deployed model: fresh scoring, fresh drift detector."""
        pipeline = pickle.loads(pipeline_blob) if pipeline_blob else None  # noqa: S301 - our own DB
        self.champion = Champion(
            version, learner, pipeline, self.config, self.promotion.window, self.samples
        )
        self.drift.reset()
        self.drift_at = None
        self.drift_pending = None
        self.promoted_at = self.samples
        self.promotion_pending = False

    def report(self) -> dict[str, Any]:
        chal = self.challenger()
        return {
            "name": self.name,
            "task": self.task,
            "samples": self.samples,
            "challenger": None if chal is None else chal.name,
            "champion": None if self.champion is None else self.champion.report(),
            "candidates": {
                c.name: {"n_learned": c.n_learned, "steps": c.steps, **c.report()}
                for c in self.candidates.values()
            },
            "drift": {
                "detector": self.drift_config.detector,
                "detections": self.drift.detections,
                "pending": self.drift_pending is not None,
                "seen": self.drift.seen,
            },
            "edge_frames": self.edge_frames,
            "edge_frames_other_version": self.edge_frames_other_version,
        }
