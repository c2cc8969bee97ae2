"""The rollout and device-in-rollout machines: drawn from their edge tables, enforced.

The drawings in ``fleet/rollout/state.py`` are the tables' own; the executor refuses a
move the tables do not declare; and no sequence of reports, timeouts and operator
actions makes it want one.
"""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.agent.protocol.update_state import UpdateState
from edgefleet.fleet.errors import ConflictError
from edgefleet.fleet.rollout import executor, state
from edgefleet.fleet.rollout.edges import Edges
from edgefleet.fleet.rollout.executor import DeviceView, Observations, Quality
from edgefleet.fleet.rollout.spec import Gates, RolloutSpec, Selector, parse_waves
from edgefleet.fleet.rollout.state import (
    DEVICE_EDGES,
    ROLLOUT_EDGES,
    DeviceState,
    Rollout,
    RolloutDevice,
    RolloutState,
)
from tests.hostile import HOSTILE

OLD = BundleRef(name="digits", version="1.0.0", sha256="1" * 64)
NEW = BundleRef(name="digits", version="2.0.0", sha256="2" * 64)
SPEC = RolloutSpec(model=NEW, url="http://c/b.efb", size=100,
                   selectors=(Selector("group", "cams"),), waves=parse_waves("50%,100%"),
                   device_timeout_s=10.0, soak_s=5.0,
                   gates=Gates(max_failures_pct=50.0, min_success_pct=50.0))


@pytest.mark.parametrize("edges", [ROLLOUT_EDGES, DEVICE_EDGES], ids=lambda e: e.machine)
def test_the_drawing_in_the_state_module_is_the_edge_table(edges: Edges[DeviceState]) -> None:
    assert state.__doc__ is not None
    assert textwrap.indent(edges.drawing(), "    ") in state.__doc__, edges.drawing()


def test_the_final_states_are_the_ones_no_edge_leaves() -> None:
    assert {s for s in DeviceState if not DEVICE_EDGES.table.get(s)} == {
        DeviceState.INCOMPATIBLE, DeviceState.CANCELLED, DeviceState.ROLLED_BACK}
    assert all(ROLLOUT_EDGES.table.get(s) for s in RolloutState), "a rollback always may"


def test_a_drawing_lists_each_moving_state_once_with_its_targets_in_declared_order() -> None:
    edges = Edges.declare("demo", {RolloutState.PAUSED: (RolloutState.ABORTED,
                                                         RolloutState.RUNNING),
                                   RolloutState.PENDING: (RolloutState.RUNNING,)})
    assert edges.drawing() == "PENDING -> RUNNING\nPAUSED  -> RUNNING | ABORTED"


def test_an_undeclared_device_move_raises() -> None:
    rollout = Rollout("r1", SPEC, RolloutState.RUNNING,
                      devices={"d0": RolloutDevice("d0", 0, DeviceState.SUCCEEDED)})
    step = executor._Step(rollout, Observations({}), 1000)
    with pytest.raises(RuntimeError, match="no device edge SUCCEEDED -> UPDATING"):
        step.move(rollout.devices["d0"], DeviceState.UPDATING)


def test_an_undeclared_rollout_move_raises() -> None:
    step = executor._Step(Rollout("r1", SPEC, RolloutState.SUCCEEDED), Observations({}), 1000)
    with pytest.raises(RuntimeError, match="no rollout edge SUCCEEDED -> RUNNING"):
        step.state(RolloutState.RUNNING)


def test_operator_refusals_stay_conflicts_not_edge_errors() -> None:
    with pytest.raises(ConflictError):
        executor.resume(Rollout("r1", SPEC, RolloutState.SUCCEEDED), 1000)


VIEWS = st.builds(
    DeviceView, online=st.booleans(), active=st.sampled_from([None, OLD, NEW]),
    update_state=st.sampled_from([s.value for s in UpdateState]),
    update_target=st.sampled_from([None, OLD.sha256, NEW.sha256]),
    update_since_ms=st.integers(0, 60_000), update_detail=st.just("x"),
    incompatible=st.sampled_from([None, None, None, "no runtime"]))
DEVICES = ["d0", "d1", "d2"]
STEPS = st.one_of(
    st.tuples(st.just("tick"), st.fixed_dictionaries({d: VIEWS for d in DEVICES}),
              st.integers(0, 20_000)),
    st.tuples(st.sampled_from(["pause", "resume", "abort", "rollback", "rollback d0"]),
              st.none(), st.integers(0, 20_000)))


@HOSTILE
@given(steps=st.lists(STEPS, min_size=1, max_size=25))
def test_no_reports_timeouts_or_operator_actions_make_an_undeclared_move(
        steps: list[tuple[str, dict[str, DeviceView] | None, int]]) -> None:
    rollout, now = Rollout("r1", SPEC), 0
    for action, views, advance in steps:
        now += advance
        before = rollout
        try:
            rollout = _act(rollout, action, views, now)
        except ConflictError:
            continue
        _assert_declared(before, rollout)


def _act(rollout: Rollout, action: str, views: dict[str, DeviceView] | None,
         now: int) -> Rollout:
    if action == "tick":
        assert views is not None
        return executor.tick(rollout, Observations(views, Quality(), Quality()), now).rollout
    if action == "rollback d0":
        return executor.rollback(rollout, now, only=frozenset({"d0"})).rollout
    operate = {"pause": executor.pause, "resume": executor.resume, "abort": executor.abort,
               "rollback": executor.rollback}[action]
    return operate(rollout, now).rollout


def _assert_declared(before: Rollout, after: Rollout) -> None:
    if after.state != before.state:
        assert ROLLOUT_EDGES.allows(before.state, after.state)
    for device, item in after.devices.items():
        old = before.devices.get(device)
        if old is not None and old.state != item.state:
            assert DEVICE_EDGES.allows(old.state, item.state), (old.state, item.state)

