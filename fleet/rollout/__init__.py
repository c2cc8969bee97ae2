"""Rollouts: the plan (``spec``), the state (``state``) and the pure executor (``executor``)."""
