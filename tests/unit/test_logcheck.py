"""A log end below the position counts only when seen twice at the same position."""

from __future__ import annotations

from shared.logcheck import LogEndWatch, log_ends


def test_a_short_log_is_reported_on_the_second_sighting_at_the_same_position():
    w = LogEndWatch(min_interval=1.0)
    assert w.check({"a": 50, "b": 10}, {"a": 16, "b": 10}, now=0.0) == []  # a: first sighting
    assert w.check({"a": 50, "b": 10}, {"a": 16, "b": 12}, now=0.5) == []  # too soon to tell
    assert w.check({"a": 50, "b": 10}, {"a": 16, "b": 12}, now=1.0) == ["a"]
    assert w.check({"a": 50}, {"a": 16}, now=1.1) == []  # reported once, then watched afresh


def test_a_consumer_that_moves_on_was_reading_a_healthy_log():
    w = LogEndWatch(min_interval=1.0)
    assert w.check({"a": 50}, {"a": 40}, now=0) == []  # a stale answer
    assert w.check({"a": 61}, {"a": 55}, now=2) == []  # another, but the position moved
    assert w.check({"a": 61}, {"a": 70}, now=4) == []  # and the end is back above it
    assert w.check({"a": 61}, {"a": 40}, now=6) == []  # a new suspicion starts from scratch


class _Consumer:
    def __init__(self, answers, hw):
        self.answers = list(answers)
        self.hw = hw

    async def end_offsets(self, tps):
        return self.answers.pop(0)

    def highwater(self, tp):
        return self.hw.get(tp)


async def test_log_ends_takes_the_largest_answer_and_the_high_watermark():
    c = _Consumer([{"a": 3, "b": 9}, {"a": 14, "b": 2}, {"a": 12, "b": 2}], {"a": 13, "b": None})
    assert await log_ends(c, ["a", "b"], tries=3, pause=0) == {"a": 14, "b": 9}
