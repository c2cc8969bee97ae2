"""Revoking device certificates: the fleet CA's certificate revocation list (CRL).

A device that is lost or compromised keeps a certificate the broker would accept until
it expires. ``edgefleet certs revoke`` adds its serial number to ``ca.crl`` in the CA's
folder, signed by the CA; a broker started with that file (``BrokerSecurity.crlfile``,
Mosquitto's ``crlfile``) refuses the certificate in the TLS handshake, and reads the
file again on SIGHUP (``systemctl reload mosquitto``). The list is
cumulative (every revocation stays) and has a ``next_update`` date: OpenSSL refuses
every client once it has passed, so re-issue it (``certs revoke --renew``) before then.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from edgefleet.agent.protocol.files import atomic_write
from edgefleet.fleet.certs import CertError, Issued, describe

__all__ = ["CRL_DAYS", "CRL_FILE", "read_crl", "revoke", "revoked_serials", "save_crl",
           "summary"]

CRL_FILE = "ca.crl"
CRL_DAYS = 365


def revoke(ca: Issued, certificates: Iterable[x509.Certificate],
           previous: x509.CertificateRevocationList | None = None, days: int = CRL_DAYS,
           now: dt.datetime | None = None) -> x509.CertificateRevocationList:
    """A new CRL signed by ``ca``: what ``previous`` revoked plus ``certificates``
    (each must be issued by ``ca``); valid ``days`` from ``now``."""
    if days < 1:
        raise CertError(f"a revocation list valid {days} days is not possible",
                        hint="pass --days 1 or more")
    when = now or dt.datetime.now(dt.timezone.utc)
    if previous is not None:
        _check_signed(previous, ca)
    entries = {entry.serial_number: entry for entry in (previous or [])}
    for cert in certificates:
        if cert.issuer != ca.cert.subject:
            raise CertError(f"{describe(cert)['common_name']!r} was not issued by this CA "
                            f"({cert.issuer.rfc4514_string()})",
                            hint="revoke it with the CA that issued it (--dir)")
        if cert.serial_number not in entries:
            entries[cert.serial_number] = (x509.RevokedCertificateBuilder()
                                           .serial_number(cert.serial_number)
                                           .revocation_date(when).build())
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
               .last_update(when).next_update(when + dt.timedelta(days=days))
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False))
    for entry in entries.values():
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca.key, hashes.SHA256())


def revoked_serials(crl: x509.CertificateRevocationList) -> set[int]:
    return {entry.serial_number for entry in crl}


def summary(crl: x509.CertificateRevocationList, path: Path) -> dict[str, Any]:
    next_update = crl.next_update_utc
    return {"crl": str(path), "revoked": len(crl),
            "next_update": next_update.isoformat() if next_update else None}


def _check_signed(crl: x509.CertificateRevocationList, ca: Issued) -> None:
    public = ca.cert.public_key()
    if crl.issuer != ca.cert.subject or not crl.is_signature_valid(public):  # type: ignore[arg-type]
        raise CertError("the existing revocation list was not signed by this CA",
                        hint="pass the --dir of the CA that wrote it, or move the file away")


# --- files (the edge) --------------------------------------------------------------------

def read_crl(path: Path) -> x509.CertificateRevocationList | None:
    """The CRL in ``path`` (None when there is none yet)."""
    try:
        return x509.load_pem_x509_crl(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CertError(f"cannot read {path}: {exc.strerror}",
                        hint="check the file's permissions") from exc
    except ValueError as exc:
        raise CertError(f"{path} is not a PEM revocation list: {exc}",
                        hint="move it away; 'edgefleet certs revoke' writes a new one") from exc


def save_crl(crl: x509.CertificateRevocationList, path: Path) -> Path:
    try:
        atomic_write(path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
    except OSError as exc:
        raise CertError(f"cannot write {path}: {exc.strerror}",
                        hint="run where the CA's folder is writable") from exc
    return path
