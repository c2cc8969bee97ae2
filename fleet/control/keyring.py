"""The fleet keyring: which signing keys devices trust (docs/keys.md), and the keys this
controller verifies pushed bundles with.

:class:`KeyringService` owns the trusted keys: it starts from the keys the controller
was given, and every keyring it accepts (published here, or stored by another
controller) replaces them. The keyring's signed bytes live in the store every
controller shares and go out retained to every device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.agent.mqtt import MqttClient
from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.keyring import (
    KEYRING_FILE,
    SignedKeyring,
    accept_keyring,
    load_keyring,
    parse_keyring,
)
from edgefleet.agent.protocol.signing import TrustedKeys
from edgefleet.agent.protocol.topics import keyring_topic
from edgefleet.fleet.control import CONTROLLER_LOG
from edgefleet.fleet.control.audit import AuditTrail
from edgefleet.fleet.errors import ConflictError
from edgefleet.fleet.registry import DeviceRegistry
from edgefleet.fleet.store import Store

__all__ = ["Accepted", "KeyringService"]

log = logging.getLogger(CONTROLLER_LOG)
_KEYRING_KEY = "keyring"  # settings key of the fleet keyring's signed bytes


@dataclass(frozen=True)
class Accepted:
    """A keyring an operator published: the one now in force, and what it changed."""

    keyring: SignedKeyring
    changed: bool
    stranded: list[str]


class KeyringService:
    """The keys trusted now, the stored keyring, and its publication to devices."""

    def __init__(self, trusted: TrustedKeys, store: Store, data_dir: Path, fleet: str,
                 registry: DeviceRegistry, audit: AuditTrail,
                 clock: Callable[[], int]) -> None:
        self.trusted = trusted
        self.store, self.data_dir, self.fleet = store, data_dir, fleet
        self.registry, self.audit, self.clock = registry, audit, clock
        self._parsed: tuple[str, SignedKeyring] | None = None  # (stored text, parsed)
        self._mqtt: MqttClient | None = None

    def start(self, mqtt: MqttClient) -> None:
        """Trust the stored keyring's keys, and publish it (retained) on every
        connection, so a broker that lost its retained messages gets it back."""
        stored = self.current()
        if stored is not None:
            self._trust(stored)
        self._mqtt = mqtt
        mqtt.on_connect(self._publish_stored)

    def current(self) -> SignedKeyring | None:
        """The fleet keyring (None before the first rotation), from the store every
        controller shares; a keyring kept in the data folder by an earlier edgefleet moves
        into the store."""
        raw = self.store.settings(_KEYRING_KEY).get(_KEYRING_KEY)
        if isinstance(raw, str):
            cached = self._parsed
            if cached is None or cached[0] != raw:  # parsed (signatures checked) once
                cached = self._parsed = raw, parse_keyring(raw.encode())
            return cached[1]
        local = load_keyring(self.data_dir / KEYRING_FILE)
        if local is not None:
            self.store.put_setting(_KEYRING_KEY, local.raw.decode(), self.clock())
        return local

    def follow(self) -> None:
        """Trust the keyring another controller published (scale-out), once it is stored."""
        try:
            stored = self.current()
        except EdgefleetError as exc:
            log.error("the stored keyring is unreadable: %s", exc)
            return
        if stored is not None and set(stored.key_ids) != set(self.trusted.key_ids):
            self._trust(stored)

    def accept(self, raw: bytes, actor: str, force: bool) -> Accepted:
        """Check a keyring against the keys trusted here (signature, serial), keep it and
        trust its keys from now on; refused (and audited) when it strands devices."""
        try:
            held = self.current()
            keyring = accept_keyring(raw, self.trusted, held)
            stranded = self._stranded(keyring) if keyring is not None else []
            if stranded and not force:
                raise ConflictError(
                    f"{len(stranded)} devices run a bundle not known to be signed by a key "
                    f"of this keyring, and could not load it again after a restart: "
                    f"{', '.join(stranded[:5])}",
                    hint="roll out a bundle signed by a key that stays first (push the "
                         "bundle a device runs if it is not here), or pass --force")
        except EdgefleetError as exc:
            self.audit.record(actor, "keyring.publish", "keyring", str(exc), outcome="refused")
            raise
        if keyring is None:
            assert held is not None  # accept_keyring returns None only for the held one
            return Accepted(held, False, stranded)
        self.store.put_setting(_KEYRING_KEY, keyring.raw.decode(), self.clock())
        self._trust(keyring)
        self.audit.record(actor, "keyring.publish", "keyring",
                          f"serial {keyring.serial}: {', '.join(keyring.key_ids)}",
                          signed_by=keyring.signed_by, stranded=stranded)
        return Accepted(keyring, True, stranded)

    def publish(self, accepted: Accepted) -> dict[str, Any]:
        """Publish an accepted keyring retained to every device; what the API answers."""
        return {**accepted.keyring.summary(), "changed": accepted.changed,
                "stranded": accepted.stranded,
                "published": self._publish_now(accepted.keyring)}

    def _trust(self, keyring: SignedKeyring) -> None:
        self.trusted = keyring.trusted()

    def _stranded(self, keyring: SignedKeyring) -> list[str]:
        """When ``keyring`` drops a key: the devices whose active bundle is not known to be
        signed by a key it keeps."""
        keep, signers = set(keyring.key_ids), {}
        stranded: list[str] = []
        if not set(self.trusted.key_ids) - keep:
            return stranded  # only adds keys
        for device in self.registry.all():
            if device.active is None:
                continue
            sha256 = device.active.sha256
            if sha256 not in signers:
                signers[sha256] = self._signer(sha256, keyring)
            if signers[sha256] not in keep:
                stranded.append(f"{device.id} ({device.active.name}:{device.active.version}, "
                                f"{signers[sha256] or 'a bundle not pushed here'})")
        return stranded

    def _signer(self, sha256: str, keyring: SignedKeyring) -> str | None:
        """The key id that signed a pushed bundle; None when this controller cannot tell."""
        model = self.store.model_by_sha(sha256)
        if model is None:
            return None
        both = TrustedKeys({**self.trusted.public_keys(), **keyring.trusted().public_keys()})
        try:
            return read_bundle(Path(model.path), both).key_id
        except EdgefleetError as exc:
            return f"unverifiable: {exc.message}"

    def _publish_now(self, keyring: SignedKeyring) -> bool:
        """Publish and wait for the broker; False: it goes out on the next connection."""
        mqtt = self._mqtt
        if mqtt is None or not mqtt.connected:
            return False
        try:
            mqtt.publish_wait(keyring_topic(self.fleet), keyring.raw, qos=1,
                              retain=True, timeout=5.0)
        except EdgefleetError as exc:
            log.warning("the keyring goes out on the next connection: %s", exc)
            return False
        return True

    def _publish_stored(self) -> None:
        try:
            stored = self.current()
        except EdgefleetError as exc:
            log.error("not publishing the stored keyring: %s", exc)
            return
        if stored is not None and self._mqtt is not None:
            self._mqtt.publish(keyring_topic(self.fleet), stored.raw, qos=1, retain=True)
