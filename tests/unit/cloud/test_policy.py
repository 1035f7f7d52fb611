"""The promotion policy: first champion, margin over a window, drift, and what blocks each."""

from __future__ import annotations

import pickle
import random

import pytest

from cloud.config import DriftConfig, ModelConfig, PromotionConfig
from cloud.learning import ModelLearner, PromotionDecision, build_pipeline
from shared.records import Frame

T0 = 1_700_000_000_000_000_000
POLICY = PromotionConfig(
    min_samples=50, window=50, margin=0.1, cooldown_samples=60, min_samples_after_drift=40
)


def learner(policy: PromotionConfig = POLICY, **drift) -> ModelLearner:
    return ModelLearner(ModelConfig(name="q"), DriftConfig(**drift), policy)


class Feed:
    """Samples of ``y = (t > 0) xor flipped``; optionally the edge's prediction for a version."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.i = 0

    def run(self, ml, n, *, flipped=False, edge_rule=None, version=None, apply=True):
        decisions: list[PromotionDecision] = []
        drifts = []
        for _ in range(n):
            t = self.rng.uniform(-1, 1)
            y = int((t > 0) != flipped)
            pred = None if edge_rule is None else float(int((t > 0) != edge_rule))
            frame = Frame("press-1", f"p{self.i}", T0 + self.i, {"t": t}, pred, version)
            self.i += 1
            det = ml.learn(frame, y)
            if det is not None:
                drifts.append((ml.samples, det))
            d = ml.evaluate_promotion()
            if d is not None:
                decisions.append(d)
                if apply:
                    v = 1 if ml.champion is None else ml.champion.version + 1
                    ml.install_champion(v, d.learner, d.pipeline_blob)
        return decisions, drifts


def test_the_first_champion_comes_once_a_candidate_learned_min_samples():
    ml, feed = learner(), Feed()
    decisions, _ = feed.run(ml, 49)
    assert decisions == []
    decisions, _ = feed.run(ml, 1)
    (d,) = decisions
    assert d.reason == "initial" and d.evidence["challenger_samples"] == 50
    assert d.learner in ml.candidates and d.features == ["t"]
    assert pickle.loads(d.pipeline_blob).predict_one({"t": 0.9}) in (1, True)


def test_a_challenger_replaces_the_champion_when_it_wins_by_the_margin_over_the_window():
    ml, feed = learner(), Feed()
    # the champion is an untrained copy: about half right
    blank = pickle.dumps(build_pipeline(ModelConfig().effective_learners()[0].pipeline))
    feed.run(ml, 100, apply=False)
    ml.install_champion(1, "logistic", blank)
    promoted_at = ml.samples
    decisions, _ = feed.run(ml, 59)  # inside the cooldown
    assert decisions == []
    decisions, _ = feed.run(ml, 1)
    (d,) = decisions
    assert d.reason == "margin" and ml.samples - promoted_at == 60
    ev = d.evidence
    assert ev["gain"] >= 0.1 and ev["champion_source"] == "cloud"
    assert ev["champion_samples"] == ev["window"] == 50
    assert ev["challenger_window_value"] - ev["champion_window_value"] == ev["gain"]


def test_no_promotion_below_the_margin_or_while_one_is_pending():
    ml, feed = learner(PromotionConfig(min_samples=50, window=50, margin=0.5)), Feed()
    feed.run(ml, 60)  # initial
    assert ml.champion is not None and ml.champion.version == 1
    decisions, _ = feed.run(ml, 300)
    assert decisions == []  # nothing beats a good champion by 0.5
    ml2, feed2 = learner(), Feed()
    decisions, _ = feed2.run(ml2, 50, apply=False)
    assert len(decisions) == 1
    ml2.promotion_pending = True  # the service is registering it
    assert feed2.run(ml2, 50, apply=False)[0] == []
    assert learner(PromotionConfig(enabled=False)).evaluate_promotion() is None


def test_a_drift_at_the_edge_promotes_the_challenger_after_min_samples_after_drift():
    ml, feed = learner(detector="ADWIN", params={"delta": 0.002}), Feed()
    feed.run(ml, 60)  # champion v1
    # the edge runs v1 and is right; then the shopfloor flips and the edge is wrong
    decisions, drifts = feed.run(ml, 300, edge_rule=False, version=1)
    assert decisions == [] and drifts == []
    decisions, drifts = feed.run(ml, 400, flipped=True, edge_rule=False, version=1)
    assert drifts, "no drift detected"
    at, det = drifts[0]
    assert det.source == "edge" and det.version == 1
    d = decisions[0]
    assert d.reason == "drift"
    assert d.evidence["drift"]["at_sample"] == at
    assert d.evidence["drift"]["samples_since"] == 40
    assert d.evidence["gain"] > 0 and d.evidence["champion_source"] == "edge"


def test_a_false_alarm_does_not_replace_a_champion_that_does_better():
    ml, feed = learner(), Feed()
    feed.run(ml, 60)
    # the edge is always right; the candidates cannot beat it
    feed.run(ml, 100, edge_rule=False, version=1)
    ml.drift_at = ml.samples  # a (false) detection
    decisions, _ = feed.run(ml, 200, edge_rule=False, version=1)
    assert decisions == []
    assert ml.drift_at is not None  # still pending, answered by the first challenger that wins


def _stream(n: int, seed: int = 3) -> list[tuple[Frame, int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = rng.uniform(-1, 1)
        flipped = i >= n // 2
        y = int((t > 0) != flipped)
        # the edge runs v1 and knows the old rule; a third of the frames carry no prediction
        pred = None if i % 3 == 0 else float(int(t > 0))
        asset = ("press-1", "press-2")[(i // 50) % 2]
        out.append(
            (Frame(asset, f"p{i}", T0 + i, {"t": t}, pred, 1 if pred is not None else None), y)
        )
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def test_learning_a_batch_gives_the_same_figures_and_drifts_as_sample_by_sample():
    blank = pickle.dumps(build_pipeline(ModelConfig().effective_learners()[0].pipeline))
    stream = _stream(1200)
    one, many = learner(detector="ADWIN"), learner(detector="ADWIN")
    for ml in (one, many):
        ml.install_champion(1, "logistic", blank)
    drifts_one = [d for d in (one.learn(f, y) for f, y in stream) if d is not None]
    drifts_many = []
    for i in range(0, len(stream), 37):  # uneven batches, some spanning two assets
        chunk = stream[i : i + 37]
        drifts_many += many.learn_many([f for f, _ in chunk], [y for _, y in chunk])
    assert drifts_one, "the flip must be detected"
    assert [(d.samples, d.source, d.evidence) for d in drifts_many] == [
        (d.samples, d.source, d.evidence) for d in drifts_one
    ]
    assert many.drift_at == one.drift_at and many.samples == one.samples
    # equal up to float rounding (the sums are folded in different chunks)
    assert _flat(many.report()["candidates"]) == pytest.approx(_flat(one.report()["candidates"]))
    assert _flat(many.champion.report()) == pytest.approx(_flat(one.champion.report()))
    for name, cand in one.candidates.items():
        assert many.candidates[name].promo.get() == pytest.approx(cand.promo.get())
    assert many.champion_figure() == pytest.approx(one.champion_figure())
    assert (many.edge_frames, many.edge_frames_other_version) == (800, 0)
