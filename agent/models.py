"""The models a device serves, by name: each one an :class:`~edgefleet.agent.core.Agent` of
its own.

A camera runs a detector and a classifier; each model has its own A/B slots
(:mod:`edgefleet.agent.update.layout`), health check, probation, rollback, counters, drift
sampler and shadow, because each is served by its own ``Agent``. Requests are routed by
name, so swapping one model's reference never touches another's: a request to model B
runs while model A switches. What the models share is the trust: the keys that verify a
bundle, the keys that open an encrypted one, the inference threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from edgefleet.agent.core import Agent
from edgefleet.agent.errors import AgentError
from edgefleet.agent.loader import LoadedModel
from edgefleet.agent.protocol.encryption import DecryptionKeys
from edgefleet.agent.protocol.signing import TrustedKeys

__all__ = ["ModelSet", "UnknownModelError"]


class UnknownModelError(AgentError):
    """A model name this device does not serve (``agent remove``, a request by name)."""


class ModelSet:
    """Name -> :class:`Agent`; thread-safe."""

    def __init__(self, trusted: TrustedKeys, *, threads: int = 1,
                 keys: DecryptionKeys | None = None) -> None:
        self.trusted, self.threads = trusted, threads
        self.keys = keys if keys is not None else DecryptionKeys()
        self._agents: dict[str, Agent] = {}
        self._broken: dict[str, str] = {}  # installed models that cannot be served: reason
        self._listeners: list[Callable[[LoadedModel], None]] = []
        self._lock = threading.Lock()

    @classmethod
    def of(cls, agent: Agent, name: str | None = None) -> ModelSet:
        """A set holding ``agent`` under ``name``, else under its model's name (an agent
        with no model yet and no name is not held); later models share its keys."""
        models = cls(agent.trusted, threads=agent.threads, keys=agent.keys)
        model = agent.model
        key = name if name is not None else (model.name if model is not None else None)
        if key is not None:
            models._agents[key] = agent
        return models

    def get(self, name: str) -> Agent | None:
        return self._agents.get(name)

    def __getitem__(self, name: str) -> Agent:
        agent = self._agents.get(name)
        if agent is None:
            raise UnknownModelError(f"this device serves no model {name[:100]!r}; it serves "
                                    f"{', '.join(self.names()) or 'none'}",
                                    hint="see 'edgefleet agent status'")
        return agent

    def __contains__(self, name: object) -> bool:
        return name in self._agents

    def __len__(self) -> int:
        return len(self._agents)

    def names(self) -> list[str]:
        return sorted(self._agents)

    def items(self) -> list[tuple[str, Agent]]:
        return sorted(self._agents.items())

    def agent(self, name: str) -> Agent:
        """The agent of ``name``, made (empty, sharing the keys) when it has none yet."""
        with self._lock:
            agent = self._agents.get(name)
            if agent is None:
                agent = Agent(self.trusted, threads=self.threads, keys=self.keys)
                for listener in self._listeners:
                    agent.on_change(listener)
                self._agents[name] = agent
            return agent

    def mark_broken(self, name: str, reason: str) -> None:
        """An installed model that cannot be served (its bundle does not load): the set is
        not ready while it is, until the model serves again or is removed."""
        with self._lock:
            self._broken[name] = reason

    def broken(self) -> dict[str, str]:
        """The installed models that cannot be served, with their reasons (those that serve
        again since are left out)."""
        return {name: reason for name, reason in sorted(self._broken.items())
                if not (name in self._agents and self._agents[name].ready)}

    def forget(self, name: str) -> None:
        """A broken model removed from the device."""
        with self._lock:
            self._broken.pop(name, None)

    def remove(self, name: str) -> Agent:
        """Stop serving ``name``; its agent is closed and returned."""
        with self._lock:
            agent = self[name]
            del self._agents[name]
        agent.close()
        return agent

    @property
    def ready(self) -> bool:
        """Every installed model serves: some model serves (a model serves from its first
        load until its agent is closed: removed, or the set closed) and none installed
        failed to load (:meth:`mark_broken`). An agent whose first bundle is still on its way
        (a model the fleet adds) is not a model yet."""
        return any(agent.ready for agent in list(self._agents.values())) and not self.broken()

    def only(self) -> Agent:
        """The agent of the one model (for callers that serve exactly one)."""
        agents = list(self._agents.values())
        if len(agents) != 1:
            raise UnknownModelError(f"this device serves {len(agents)} models, not one",
                                    hint="name the model")
        return agents[0]

    def on_change(self, listener: Callable[[LoadedModel], None]) -> None:
        """Call ``listener`` with every model any agent activates, now and later."""
        with self._lock:
            self._listeners.append(listener)
            for agent in self._agents.values():
                agent.on_change(listener)

    def trust(self, trusted: TrustedKeys) -> None:
        """Verify every model's bundles against ``trusted`` from now on."""
        self.trusted = trusted
        for agent in list(self._agents.values()):
            agent.trust(trusted)

    def close(self) -> None:
        for agent in list(self._agents.values()):
            agent.close()

    def telemetry_values(self) -> dict[str, Any]:
        """Every model's window under ``models``, and the first model's again as flat keys
        (what a reader that knows one model reads)."""
        per_model = {name: agent.telemetry_values() for name, agent in self.items()}
        first = next(iter(per_model.values()), {})
        values = dict(first)
        if per_model:
            values["models"] = per_model
        return values
