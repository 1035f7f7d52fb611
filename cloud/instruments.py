"""Prometheus metrics of the cloud service, on a registry of its own (one per service instance).

Counters are monotonic (use ``rate()`` for ingest and learn rates); gauges that mirror state
(prequential figures, lag, pending joins) are refreshed by :meth:`CloudMetrics.refresh` just
before each scrape, so the hot path only touches plain Python counters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

if TYPE_CHECKING:
    from cloud.service import CloudService

__all__ = ["CloudMetrics"]

_NS = "edgeloop_cloud"


class CloudMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.ingest_batches = Counter(
            f"{_NS}_ingest_batches", "Batches consumed, by topic", ["topic"], registry=r
        )
        self.ingest_records = Counter(
            f"{_NS}_ingest_records", "Records applied, by topic", ["topic"], registry=r
        )
        self.dedupe_drops = Counter(
            f"{_NS}_dedupe_dropped_batches",
            "Batches dropped as already applied (agent_id, batch_seq)",
            ["topic"],
            registry=r,
        )
        self.poison = Counter(
            f"{_NS}_poison_messages", "Undecodable messages skipped", ["topic"], registry=r
        )
        self.consumer_lag = Gauge(
            f"{_NS}_consumer_lag",
            "High watermark minus position",
            ["topic", "partition"],
            registry=r,
        )
        self.checkpoints = Counter(f"{_NS}_checkpoints", "Checkpoints written", registry=r)
        self.checkpoint_failures = Counter(
            f"{_NS}_checkpoint_failures", "Checkpoints that failed (retried)", registry=r
        )
        self.join = Gauge(
            f"{_NS}_join",
            "Join counters (frames, labels, joined, waited, late_labels, "
            "never_labelled, orphan_labels, ...)",
            ["what"],
            registry=r,
        )
        self.join_pending = Gauge(
            f"{_NS}_join_pending", "Frames and labels waiting for each other", ["kind"], registry=r
        )
        self.learned = Gauge(
            f"{_NS}_learned_samples",
            "Samples learned, by model and learner",
            ["model", "learner"],
            registry=r,
        )
        self.prequential = Gauge(
            f"{_NS}_prequential",
            "Prequential metric of a candidate (window: overall | rolling)",
            ["model", "learner", "metric", "window"],
            registry=r,
        )
        self.champion_metric = Gauge(
            f"{_NS}_champion_metric",
            "Metric of the deployed version (source: edge predictions | cloud replica)",
            ["model", "version", "source", "metric", "window"],
            registry=r,
        )
        self.champion_version = Gauge(
            f"{_NS}_champion_version", "Current champion version", ["model"], registry=r
        )
        self.drift_detections = Counter(
            f"{_NS}_drift_detections", "Drift detections", ["model", "source"], registry=r
        )
        self.promotions = Counter(
            f"{_NS}_promotions", "Champion changes, by reason", ["model", "reason"], registry=r
        )
        self.agents = Gauge(f"{_NS}_agents", "Agents seen (heartbeats)", registry=r)
        self.log_lost = Counter(
            f"{_NS}_log_lost",
            "Partitions whose Kafka log was found lost, truncated or replaced (the cloud resumed "
            "from what the broker still has and asked the agents to replay)",
            ["topic", "reason"],
            registry=r,
        )
        self.replay_requests = Counter(
            f"{_NS}_replay_requests",
            "Replay requests sent to agents, by cause",
            ["cause"],
            registry=r,
        )
        self.acks_published = Counter(
            f"{_NS}_acks_published",
            "End-to-end acknowledgements published on the control topic",
            registry=r,
        )
        self.control_errors = Counter(
            f"{_NS}_control_publish_errors", "Failed control-topic publish rounds", registry=r
        )
        self.quarantined = Counter(
            f"{_NS}_quarantined_records",
            "Records set aside as dead-letter events (undecodable record, unlearnable sample)",
            ["topic", "stage"],
            registry=r,
        )
        self.dedupe_overflow = Counter(
            f"{_NS}_dedupe_window_overflows",
            "Dedupe windows that had to forget applied batches (a replay below would be lost)",
            registry=r,
        )
        self.incarnations = Counter(
            f"{_NS}_agent_incarnations",
            "New agent incarnations seen (a gateway whose outbox was recreated)",
            registry=r,
        )
        self.failed = Gauge(
            f"{_NS}_failed",
            "1 once a core task died: the service exits to be restarted",
            registry=r,
        )
        self.webhook = Gauge(
            f"{_NS}_webhook_notifications", "Webhook notifications", ["result"], registry=r
        )

    def refresh(self, service: CloudService) -> None:
        for what, value in service.join.stats.as_dict().items():
            self.join.labels(what).set(value)
        self.join_pending.labels("frames").set(service.join.pending_frames)
        self.join_pending.labels("labels").set(service.join.pending_labels)
        for (topic, partition), lag in service.ingest_lag().items():
            self.consumer_lag.labels(topic, str(partition)).set(lag)
        self.agents.set(len(service.fleet))
        self.webhook.labels("sent").set(service.notifier.sent)
        self.webhook.labels("failed").set(service.notifier.failed)
        self.champion_metric.clear()
        for learner in service.learners.values():
            for cand in learner.candidates.values():
                self.learned.labels(learner.name, cand.name).set(cand.n_learned)
                for window, figs in (
                    ("overall", cand.metrics.overall()),
                    ("rolling", cand.metrics.rolling()),
                ):
                    for metric, value in figs.items():
                        self.prequential.labels(learner.name, cand.name, metric, window).set(value)
            champ = learner.champion
            if champ is not None:
                self.champion_version.labels(learner.name).set(champ.version)
                for source, scored in (("cloud", champ), ("edge", champ.edge)):
                    for window, figs in (
                        ("overall", scored.metrics.overall()),
                        ("rolling", scored.metrics.rolling()),
                    ):
                        for metric, value in figs.items():
                            self.champion_metric.labels(
                                learner.name, str(champ.version), source, metric, window
                            ).set(value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
