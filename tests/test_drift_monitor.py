"""The controller's drift alert state machine, window by window."""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.protocol.drift import (
    InputReference,
    Monitoring,
    OutputReference,
    compare,
    reference_from,
)
from edgefleet.fleet.drift import DriftMonitor, DriftPolicy, DriftView
from edgefleet.fleet.simulate.drift import DriftDraw

REFERENCE = Monitoring(
    source="eval", samples=100,
    inputs={"x": InputReference(mean=0.5, std=0.1, min=0, max=1, edges=[0.5],
                                hist=[0.5, 0.5])},
    outputs={"y": OutputReference(kind="classes", classes=[0.5, 0.5], confidence_mean=0.9,
                                  confidence_hist=[0.0] * 9 + [1.0])})


def window(low: int, high: int, classes: tuple[int, int] = (50, 50)) -> dict[str, Any]:
    return {"samples": low + high, "inputs": {"x": {"hist": [low, high]}},
            "outputs": {"y": {"classes": list(classes), "confidence_hist": [0] * 9 + [low + high]}}}


CALM, SHIFTED, FEW = window(50, 50), window(95, 5), window(9, 1)


POLICY = DriftPolicy(min_samples=30, clear_after=2)


def monitor(policy: DriftPolicy = POLICY) -> DriftMonitor:
    return DriftMonitor(lambda model, version: REFERENCE if model == "m" else None,
                        lambda model: policy)


def feed(mon: DriftMonitor, *windows: dict[str, Any], device: str = "d1") -> list[str]:
    changes = []
    for i, w in enumerate(windows):
        mon.offer(device, "m", "1.0.0", 1000 * (i + 1), w)
        changes += [f"{c.kind}:{c.alert.feature}" for c in mon.process()]
    return changes


@pytest.mark.parametrize(("windows", "changes", "firing"), [
    ((CALM, CALM), [], []),
    ((SHIFTED,), ["raised:input:x"], ["input:x"]),
    ((FEW,), [], []),  # too few samples to say anything yet
    ((FEW, FEW, FEW), ["raised:input:x"], ["input:x"]),  # pooled: 30 samples, judged
    ((window(5, 5),) * 7, [], []),  # small calm windows pooled: nothing
    ((SHIFTED, CALM), ["raised:input:x"], ["input:x"]),  # one quiet window is not enough
    ((SHIFTED, CALM, CALM), ["raised:input:x", "cleared:input:x"], []),
    ((SHIFTED, CALM, SHIFTED, CALM), ["raised:input:x"], ["input:x"]),  # the count restarts
    ((SHIFTED, window(5, 5), window(5, 5), CALM), ["raised:input:x"], ["input:x"]),  # 1 pool
    ((SHIFTED, CALM, window(5, 5), window(5, 5), window(5, 5)),
     ["raised:input:x", "cleared:input:x"], []),
    ((window(50, 50, (95, 5)),), ["raised:output:y:classes"], ["output:y:classes"]),
])
def test_alerts_follow_the_windows(windows: tuple[dict[str, Any], ...], changes: list[str],
                                   firing: list[str]) -> None:
    mon = monitor()
    assert feed(mon, *windows) == changes
    assert [a.feature for a in mon.alerts()] == firing


def _same(policy: DriftPolicy, model: str) -> DriftPolicy:
    return policy


def test_a_psi_exactly_at_the_threshold_does_not_fire_and_just_above_does() -> None:
    from edgefleet.agent.protocol.drift import compare

    # the PSI of the shifted window, then a threshold exactly there and one just below
    value = compare(REFERENCE, SHIFTED)["input:x"]
    for threshold, fires in ((value, False), (value - 1e-6, True)):
        policy = DriftPolicy(psi=threshold, min_samples=1)
        mon = DriftMonitor(lambda m, v: REFERENCE, functools.partial(_same, policy))
        assert bool(feed(mon, SHIFTED)) is fires


def test_devices_and_versions_are_judged_apart_and_summed_per_version() -> None:
    mon = monitor()
    feed(mon, SHIFTED, device="d1")
    feed(mon, CALM, device="d2")
    assert [a.device for a in mon.alerts()] == ["d1"]
    (row,) = [r for r in mon.summary() if r["feature"] == "input:x"]
    assert row["devices"] == 2 and row["firing"] == 1 and row["psi_max"] > row["psi_mean"] > 0
    mon.forget("d1")
    assert mon.alerts() == []


def test_models_without_reference_and_malformed_windows_are_skipped() -> None:
    mon = monitor()
    mon.offer("d1", "other", "1.0.0", 1, SHIFTED)  # no reference for this model
    mon.offer("d1", "m", "1.0.0", 2, {"inputs": {"x": {"hist": "not counts"}}, "samples": 50})
    mon.offer("d1", "m", "1.0.0", 3, {"inputs": {"x": {"hist": [1, 2]}}, "samples": "many"})
    mon.offer("d1", "m", "1.0.0", 4, {"inputs": {"x": {"hist": [1, -2]}}, "samples": 3})
    mon.offer("d1", "m", "1.0.0", 5, {"inputs": [["x", {"hist": [1]}]], "samples": 1})
    assert mon.process() == []
    assert mon.rejected == 4 and mon.windows == 0


@pytest.mark.parametrize("bad", [{"psi": 0}, {"psi": -1}, {"min_samples": 0},
                                 {"clear_after": 0}])
def test_a_policy_refuses_values_that_make_no_sense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DriftPolicy(**bad)  # type: ignore[arg-type]


def _summed(windows: list[dict[str, Any]], pick: Any) -> list[int]:
    return [int(c) for c in np.sum([pick(w) for w in windows], axis=0)]


@pytest.mark.parametrize("drifting", [False, True])
def test_simulated_windows_pool_to_the_reference_unless_drifting(drifting: bool) -> None:
    """Windows drawn by the simulator: the calm ones pooled to 200 samples stay under the
    threshold, the drifting ones go over it on the inputs, the classes and the confidence."""
    x = np.random.default_rng(1).random((400, 8), dtype=np.float32)
    logits = np.random.default_rng(2).normal(size=(400, 4)).astype(np.float32) * 3
    reference = reference_from({"x": x}, {"y": logits}, classifier=True, source="eval")
    draw, rng = DriftDraw(reference), np.random.default_rng(3)
    for trial in range(20):
        drawn = [draw.window(rng, 40, drifting, 1.0) for _ in range(20)]  # 10 samples each
        windows = [w for w in drawn if w is not None and w["samples"] == 10]
        assert len(windows) == 20
        pooled = {"samples": 200,
                  "inputs": {"x": {"hist": _summed(windows, lambda w: w["inputs"]["x"]["hist"])}},
                  "outputs": {"y": {key: _summed(windows, lambda w, k=key: w["outputs"]["y"][k])
                                    for key in ("classes", "confidence_hist")}}}
        scores = compare(reference, pooled)
        assert set(scores) == {"input:x", "output:y:classes", "output:y:confidence"}
        if drifting:
            assert min(scores.values()) > 0.2, (trial, scores)
        else:
            assert max(scores.values()) <= 0.2, (trial, scores)
    assert draw.window(rng, 3, drifting, 1.0) is None  # no request in four summarised
    busy = draw.window(rng, 10_000, drifting, 2.0)  # 2,500 in four; 100 in 2 s at 50/s
    assert busy is not None and busy["samples"] == 100


def test_a_journal_hands_over_each_offered_window_once_and_is_off_by_default() -> None:
    assert feed(monitor(), SHIFTED) == ["raised:input:x"]
    plain = monitor()
    plain.offer("d1", "m", "1.0.0", 1, CALM)
    assert plain.take_journal() == []
    noting = DriftMonitor(lambda model, version: REFERENCE, lambda model: POLICY, journal=True)
    noting.offer("d1", "m", "1.0.0", 1, CALM)
    noting.offer("d2", "m", "1.0.0", 2, SHIFTED)
    assert noting.take_journal() == [["d1", "m", "1.0.0", 1, CALM],
                                     ["d2", "m", "1.0.0", 2, SHIFTED]]
    assert noting.take_journal() == []
    assert noting.offered == 2


def test_merged_windows_are_judged_like_offered_ones_and_malformed_ones_counted() -> None:
    leader = monitor()
    entries: list[Any] = [["d1", "m", "1.0.0", 1, SHIFTED], ["d1", "m", "1.0.0"],
                          ["d1", "m", "1.0.0", "1", SHIFTED], ["d1", 7, "1.0.0", 1, SHIFTED],
                          ["d2", "m", "1.0.0", 2, "not a window"]]
    assert leader.merge(entries) == 1
    assert leader.merge({"not": "a list"}) == 0
    assert leader.rejected == 4 and leader.offered == 0
    assert [(c.kind, c.alert.device) for c in leader.process()] == [("raised", "d1")]


def test_a_drift_view_goes_through_json_and_a_wrong_one_is_refused() -> None:
    mon = monitor()
    feed(mon, SHIFTED)
    view = mon.view()
    again = DriftView.from_dict(json.loads(json.dumps(view.as_dict())))
    assert again == view and again.alerts[0].device == "d1" and again.windows == 1
    wrongs: list[Any] = [{}, {"alerts": [{"device": "d1"}], "summary": [], "windows": 1}, []]
    for wrong in wrongs:
        with pytest.raises(ValueError, match="not a stored drift view"):
            DriftView.from_dict(wrong)
