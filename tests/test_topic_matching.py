"""The MQTT client's own topic matching agrees with paho's on every pair of a grid."""

from __future__ import annotations

import itertools

import paho.mqtt.client as paho

from edgefleet.agent.mqtt import topic_matches

FILTERS = ["a/+/c", "a/#", "#", "+/+", "a/b/c", "+", "a/+", "a/b/#", "+/#", "/#", "+/b/+",
           "edgefleet/v1/f/+/state/reported", "edgefleet/v1/f/+/telemetry"]
TOPICS = ["a/b/c", "a", "a/b", "a/b/c/d", "x/y", "$SYS/x", "a//c", "/a", "a/", "",
          "edgefleet/v1/f/d1/state/reported", "edgefleet/v1/f/d1/telemetry",
          "edgefleet/v1/f/d1/state/desired"]


def test_matching_agrees_with_paho() -> None:
    for topic_filter, topic in itertools.product(FILTERS, TOPICS):
        assert topic_matches(topic_filter, topic) == paho.topic_matches_sub(
            topic_filter, topic), (topic_filter, topic)


def test_a_shared_subscription_matches_as_its_filter() -> None:
    for topic_filter, topic in itertools.product(FILTERS, TOPICS):
        assert topic_matches(f"$share/controllers/{topic_filter}", topic) == topic_matches(
            topic_filter, topic)
    assert not topic_matches("$share/only-a-group", "a")
