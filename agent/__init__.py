"""The on-device side of edgefleet: serve a bundle, report telemetry, apply updates.

``agent.protocol`` is the device contract that the converter and the fleet import.
"""

__version__ = "0.1.0"
