"""Serving over HTTP: the KServe v2 / Open Inference Protocol server."""

from agent.serving.http import InferenceServer

__all__ = ["InferenceServer"]
