"""X.509 for secure mode: a fleet CA, server certificates, client certificates (pure).

Every key is ECDSA P-256 (fast on a Raspberry Pi, understood by Mosquitto, OpenSSL and
Python's ``ssl``). What each certificate is for is written in its extensions, so a TLS
stack that checks strictly (Python 3.13's ``VERIFY_X509_STRICT``) accepts them:

- the CA: ``basicConstraints CA:TRUE, pathlen:0`` and ``keyUsage keyCertSign, cRLSign``;
- a server (the broker, the controller's HTTPS): ``serverAuth``, with every name and IP
  address clients dial in ``subjectAltName`` (hostname checks read only the SANs);
- a client (a device, the controller on the broker): ``clientAuth``; the common name is
  the MQTT user name that Mosquitto's ``use_identity_as_username true`` takes, so a
  device's CN is its device id.

Functions here build objects and PEM bytes; :func:`save` and :func:`load` are the only
ones that touch files (private keys are written with mode 0600, never over an existing
file unless asked).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.agent.protocol.files import atomic_write, read_small
from edgefleet.agent.protocol.topics import check_id
from edgefleet.fleet.acl import CONTROLLER_USER
from edgefleet.fleet.errors import FleetError

__all__ = [
    "CA_DAYS",
    "CLIENT_DAYS",
    "CONTROLLER_CN",
    "SERVER_DAYS",
    "CertError",
    "Issued",
    "describe",
    "issue_client",
    "issue_device",
    "issue_server",
    "load",
    "make_ca",
    "read_cert",
    "save",
    "server_context",
]

CA_DAYS, SERVER_DAYS, CLIENT_DAYS = 3650, 825, 825
CONTROLLER_CN = CONTROLLER_USER
_BACKDATE = dt.timedelta(minutes=5)  # tolerate a device clock a little behind
_ORG = "edgefleet"


class CertError(FleetError):
    """A certificate or key that cannot be made, read or written as asked."""


@dataclass(frozen=True)
class Issued:
    """A private key and its certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def common_name(self) -> str:
        return _common_name(self.cert)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


# --- issuing (pure) ----------------------------------------------------------------------

def make_ca(name: str = "edgefleet fleet CA", days: int = CA_DAYS,
            now: dt.datetime | None = None) -> Issued:
    """A self-signed CA that signs only end-entity certificates (pathlen 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    builder = (_base(subject, subject, key.public_key(), days, now)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(_usage(cert_sign=True), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    return Issued(key, builder.sign(key, hashes.SHA256()))


def issue_server(ca: Issued, hosts: list[str], days: int = SERVER_DAYS,
                 now: dt.datetime | None = None) -> Issued:
    """A TLS server certificate for every DNS name or IP address in ``hosts``."""
    if not hosts:
        raise CertError("a server certificate needs at least one host name or IP address",
                        hint="pass --host NAME (repeatable), e.g. --host broker.lan "
                             "--host 192.0.2.10")
    sans = [_san(host) for host in hosts]
    return _leaf(ca, hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, days, now,
                 x509.SubjectAlternativeName(sans))


def issue_client(ca: Issued, common_name: str, days: int = CLIENT_DAYS,
                 now: dt.datetime | None = None) -> Issued:
    """A TLS client certificate; ``common_name`` becomes the MQTT user name."""
    _check_name(common_name, "client name")
    return _leaf(ca, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, days, now)


def issue_device(ca: Issued, device_id: str, days: int = CLIENT_DAYS,
                 now: dt.datetime | None = None, controller: str = CONTROLLER_CN) -> Issued:
    """A device's client certificate: CN = the device id (what the ACL's ``%u`` matches)."""
    _check_name(device_id, "device id")
    if device_id == controller:
        raise CertError(f"device id {device_id!r} is the controller's user name",
                        hint="a device with that name would get the controller's rights; "
                             "pick another device id")
    return issue_client(ca, device_id, days, now)


def _leaf(ca: Issued, common_name: str, purpose: x509.ObjectIdentifier, days: int,
          now: dt.datetime | None, san: x509.SubjectAlternativeName | None = None) -> Issued:
    _check_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_base(_name(common_name), ca.cert.subject, key.public_key(), days, now)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_usage(cert_sign=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False))
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


def _base(subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey,
          days: int, now: dt.datetime | None) -> x509.CertificateBuilder:
    if days < 1:
        raise CertError(f"validity of {days} days is not possible", hint="pass --days 1 or more")
    start = (now or dt.datetime.now(dt.timezone.utc)) - _BACKDATE
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + _BACKDATE
                                                     + dt.timedelta(days=days)))


def _usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=False, data_encipherment=False,
                         key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c in host for c in " /:*") or host.startswith("."):
        raise CertError(f"{host!r} is not a host name or IP address",
                        hint="pass --host like broker.lan, localhost or 192.0.2.10")
    return x509.DNSName(host)


def _check_name(value: str, what: str) -> None:
    try:
        check_id(value, what)
    except ValueError as exc:
        raise CertError(str(exc), hint="the name is an MQTT topic level and user name: "
                                       "letters, digits, '.', '_' or '-'") from exc


def _check_ca(ca: Issued) -> None:
    try:
        is_ca = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertError(f"{ca.common_name!r} is not a CA certificate",
                        hint="pass the folder made by 'edgefleet certs ca'")


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


# --- reading (pure) ----------------------------------------------------------------------

def describe(cert: x509.Certificate, now: dt.datetime | None = None) -> dict[str, Any]:
    """What an operator checks: name, purpose, SANs, validity, days left, fingerprint."""
    now = now or dt.datetime.now(dt.timezone.utc)
    until = cert.not_valid_after_utc
    return {"common_name": _common_name(cert), "issuer": _issuer_cn(cert),
            "purpose": _purpose(cert), "sans": _sans(cert),
            "not_before": cert.not_valid_before_utc.isoformat(timespec="seconds"),
            "not_after": until.isoformat(timespec="seconds"),
            "days_left": (until - now).days, "serial": format(cert.serial_number, "x"),
            "sha256": cert.fingerprint(hashes.SHA256()).hex()}


def _issuer_cn(cert: x509.Certificate) -> str:
    names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _purpose(cert: x509.Certificate) -> str:
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "ca"
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "unknown"
    return "server" if ExtendedKeyUsageOID.SERVER_AUTH in usages else "client"


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


# --- files (the edge) --------------------------------------------------------------------

def save(issued: Issued, folder: Path, stem: str, *, overwrite: bool = False
         ) -> tuple[Path, Path]:
    """Write ``stem.key`` (0600) and ``stem.crt`` in ``folder``; (key path, cert path)."""
    key_path, cert_path = folder / f"{stem}.key", folder / f"{stem}.crt"
    existing = [p for p in (key_path, cert_path) if p.exists()]
    if existing and not overwrite:
        raise CertError(f"{existing[0]} already exists",
                        hint="pass --force to replace it (clients that hold the old one "
                             "keep working until it expires), or choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(key_path, issued.key_pem(), mode=0o600)
        atomic_write(cert_path, issued.cert_pem(), mode=0o644)
    except OSError as exc:
        raise CertError(f"cannot write into {folder}: {exc.strerror}",
                        hint="pass a --dir folder this user may write to") from exc
    return key_path, cert_path


def load(key_path: Path, cert_path: Path) -> Issued:
    """Read a key and its certificate (PEM), e.g. the CA to sign with."""
    try:
        key = serialization.load_pem_private_key(read_small(key_path, MAX_CERT_BYTES),
                                                 password=None)
        cert = x509.load_pem_x509_certificate(read_small(cert_path, MAX_CERT_BYTES))
    except FileNotFoundError as exc:
        raise CertError(f"{exc.filename} does not exist",
                        hint="create the CA first: edgefleet certs ca --dir FOLDER") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise CertError(f"cannot read {key_path} / {cert_path}: {exc}",
                        hint="pass PEM files written by 'edgefleet certs'") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{key_path} is not an ECDSA key", hint="use 'edgefleet certs ca'")
    if _public(key.public_key()) != _public(cert.public_key()):
        raise CertError(f"{key_path} is not the key of {cert_path}",
                        hint="keep each .key next to its own .crt")
    return Issued(key, cert)


MAX_CERT_BYTES = 1 << 20  # a PEM certificate is a few KB; a chain of them, tens


def read_cert(path: Path) -> x509.Certificate:
    """A PEM certificate from ``path``: a regular file of at most :data:`MAX_CERT_BYTES`
    (a FIFO would block the read, /dev/zero never end it)."""
    try:
        return x509.load_pem_x509_certificate(read_small(path, MAX_CERT_BYTES))
    except OSError as exc:
        raise CertError(f"cannot read {path}: {exc.strerror}",
                        hint="pass a .crt file written by 'edgefleet certs'") from exc
    except ValueError as exc:
        raise CertError(f"{path} is not a PEM certificate: {exc}",
                        hint="pass a .crt file (not a .key)") from exc


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context for the controller's HTTPS (``fleet serve --tls-cert``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ValueError) as exc:
        raise CertError(f"cannot use {cert_file} with {key_file}: {exc}",
                        hint="pass a server certificate and its own key from "
                             "'edgefleet certs server'") from exc
    return context


def _public(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))
