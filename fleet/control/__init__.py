"""The rooms of the fleet controller, joined by :class:`edgefleet.fleet.controller.FleetController`.

One module a part: :mod:`.config` (what a controller is told), :mod:`.role` (leading alone
or by lease), :mod:`.intake` (device messages), :mod:`.drift_desk` (drift policies and
alerts), :mod:`.keyring` (which signing keys the fleet trusts), :mod:`.catalog` (pushed
model versions and their bundles), :mod:`.observer` (what a rollout's tick sees),
:mod:`.outbox` (desired states on their way to devices), :mod:`.runner` (live rollouts,
ticked and applied), :mod:`.actions` (an operator's rollout actions), :mod:`.devices`
(device labels and writes), :mod:`.commands` (the table of relayable command kinds),
:mod:`.dispatch` (runs a command here or relays it to the leader), :mod:`.audit` (the
audit trail).

Nothing is imported here, so that :mod:`edgefleet.fleet.relay` can read the command table
without loading the controller. Every part logs to the controller's one log,
:data:`CONTROLLER_LOG`.
"""

__all__ = ["CONTROLLER_LOG"]

CONTROLLER_LOG = "edgefleet.fleet.controller"  # the logger every part of the controller writes to
