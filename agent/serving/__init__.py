"""Serving over HTTP: the KServe v2 / Open Inference Protocol server, and its bounds."""

from edgefleet.agent.serving.http import InferenceServer
from edgefleet.agent.serving.limits import HttpLimits

__all__ = ["HttpLimits", "InferenceServer"]
