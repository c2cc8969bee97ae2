"""TLS for a simulated fleet on a secure broker (docs/security.md): the contexts it needs.

Each simulated device proves who it is with its own client certificate, as a real one
does (``edgefleet certs device ID... --out DIR`` writes ``DIR/ID.crt`` and
``DIR/ID.key``; the broker takes the certificate's CN as the user name, so the generated
ACL applies to each device as to a real one). The fleet CA checks the broker and the
controller's ``https://`` bundle URLs. Every file is read here, before a connection is
made, and a missing or unreadable one is named with the command that makes it.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from edgefleet.fleet.simulate.options import SimulationError

__all__ = ["device_contexts", "server_checker"]

_SHOWN = 5  # missing devices named in an error


def server_checker(ca_file: Path | None) -> ssl.SSLContext:
    """What checks the broker's and the controller's certificates: the fleet CA, or the
    system's CAs without one."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise SimulationError(f"cannot use the CA file {ca_file}: {exc}",
                              hint="pass the fleet CA's certificate (ca.crt from "
                                   "'edgefleet certs ca')") from exc


def device_contexts(ids: list[str], ca_file: Path | None,
                    certs_dir: Path | None) -> dict[str, ssl.SSLContext]:
    """One TLS context per device: the CA check, and ``certs_dir/ID.crt`` + ``.key`` when
    ``certs_dir`` is given (else the devices connect without a client certificate)."""
    if certs_dir is None:
        shared = server_checker(ca_file)
        return dict.fromkeys(ids, shared)
    missing = [i for i in ids if not (certs_dir / f"{i}.crt").is_file()
               or not (certs_dir / f"{i}.key").is_file()]
    if missing:
        shown = " ".join(missing[:_SHOWN]) + (" ..." if len(missing) > _SHOWN else "")
        raise SimulationError(
            f"{len(missing)} of {len(ids)} simulated devices have no certificate and key in "
            f"{certs_dir} ({shown})",
            hint=f"make one per simulated device: edgefleet certs device {shown} "
                 f"--out {certs_dir}")
    contexts = {}
    for device in ids:
        context = server_checker(ca_file)
        try:
            context.load_cert_chain(certs_dir / f"{device}.crt", certs_dir / f"{device}.key")
        except (OSError, ValueError) as exc:
            raise SimulationError(f"the certificate of {device} in {certs_dir} cannot be "
                                  f"used: {exc}",
                                  hint="keep each ID.key next to its own ID.crt, as "
                                       "'edgefleet certs device' writes them") from exc
        contexts[device] = context
    return contexts
