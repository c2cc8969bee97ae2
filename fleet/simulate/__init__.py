"""``edgefleet fleet simulate``: thousands of simulated devices against a real broker.

Each device speaks the device contract exactly as the agent does (status and
will, reported state, events, telemetry) and applies desired states through the
agent's own update flow (:class:`edgefleet.agent.update.flow.Updater`) with simulated
effects. Models are real: verified, health-checked and run once per bundle,
and every simulated request reuses those outputs and latencies.

Layout: :mod:`~fleet.simulate.options` (knobs and faults), :mod:`~fleet.simulate.loop`
(one network thread for every connection), :mod:`~fleet.simulate.device` (one
device's behaviour), :mod:`~fleet.simulate.effects` (its update I/O),
:mod:`~fleet.simulate.models`, :mod:`~fleet.simulate.download`, :mod:`~fleet.simulate.delta`,
:mod:`~fleet.simulate.serving`, :mod:`~fleet.simulate.drift`, :mod:`~fleet.simulate.agreement`,
:mod:`~fleet.simulate.slots`, :mod:`~fleet.simulate.fleet` (the public wiring).
"""

from edgefleet.fleet.simulate.fleet import SimulatedFleet
from edgefleet.fleet.simulate.options import DeviceTraits, SimOptions, SimulationError
from edgefleet.fleet.simulate.view import DeviceView, summarize

__all__ = ["DeviceTraits", "DeviceView", "SimOptions", "SimulatedFleet", "SimulationError",
           "summarize"]
