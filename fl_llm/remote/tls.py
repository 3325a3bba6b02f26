"""The federation file, provisioning (`fl-llm provision`) and each party's credentials.

A federation file names the parties of a federation of organisations:

    name: shops
    coordinator: {name: coordinator}
    platforms:                       # in this order: platform 0, 1, 2, ...
      - {name: fashion-mall, address: fashion.example.com:7443}
      - {name: gadget-hub, address: 10.1.2.3:7443}

`provision` makes a federation CA (ECDSA P-256, `cryptography`) and, per party, a certificate whose
subject and DNS name are the party's name and a key that never leaves its bundle: OUT/<party>/
holds ca.pem, cert.pem, key.pem and a copy of the federation file — the start-up kit that party
installs. The CA's key stays in OUT/ca/ (keep it offline; it signs new parties). Every connection
is mutual TLS: the coordinator checks that the service presents the platform name it dialled, the
service that the caller presents the coordinator's name — both against this file.
"""

from __future__ import annotations

import datetime
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from fl_llm.errors import UserError

NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # a DNS label: what a certificate can name
FILES = ("ca.pem", "cert.pem", "key.pem", "federation.yaml")


@dataclass(frozen=True)
class Federation:
    name: str
    coordinator: str
    platforms: tuple[tuple[str, str], ...]  # (name, address), in platform order

    @property
    def platform_names(self) -> list[str]:
        return [n for n, _ in self.platforms]


def read_federation(path: str | Path) -> Federation:
    """The federation file at `path`, checked: one clear `UserError` for anything wrong in it."""
    from fl_llm.config_load import read_yaml

    data = read_yaml(path)
    where = f"federation file {path}"
    if not isinstance(data, dict) or not isinstance(data.get("platforms"), list) or not data["platforms"]:
        raise UserError(f"{where}: expected 'name', 'coordinator: {{name}}' and a non-empty 'platforms' list")
    coord = data.get("coordinator") or {}
    coordinator = coord.get("name", "coordinator") if isinstance(coord, dict) else coord
    platforms = []
    for i, p in enumerate(data["platforms"]):
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not isinstance(p.get("address"), str):
            raise UserError(f"{where}: platforms[{i}] needs a name and an address (host:port)")
        platforms.append((p["name"], p["address"]))
    names = [coordinator, *(n for n, _ in platforms)]
    for n in names:
        if not isinstance(n, str) or not NAME.match(n):
            raise UserError(f"{where}: party name {n!r} must be lowercase letters, digits and '-' (a DNS label)")
    if len(set(names)) != len(names):
        raise UserError(f"{where}: every party needs its own name (coordinator included)")
    return Federation(str(data.get("name", "federation")), coordinator, tuple(platforms))


@dataclass(frozen=True)
class Credentials:
    """One party's start-up kit: its name, the federation, and PEM bytes for gRPC."""

    name: str
    federation: Federation
    ca: bytes
    cert: bytes
    key: bytes


def load_bundle(bundle: str | Path) -> Credentials:
    """The bundle `provision` wrote for one party; its name is the one its certificate carries."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    root = Path(bundle)
    missing = [f for f in FILES if not (root / f).is_file()]
    if missing:
        raise UserError(f"bundle {root}: missing {', '.join(missing)} (made by `fl-llm provision`)")
    cert = (root / "cert.pem").read_bytes()
    try:
        subject = x509.load_pem_x509_certificate(cert).subject
        name = subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    except (ValueError, IndexError):
        raise UserError(f"bundle {root}: cert.pem is not a certificate made by `fl-llm provision`") from None
    return Credentials(
        str(name), read_federation(root / "federation.yaml"), (root / "ca.pem").read_bytes(), cert,
        (root / "key.pem").read_bytes(),
    )  # fmt: skip


def provision(federation_file: str | Path, out_dir: str | Path, days: int = 365) -> list[Path]:
    """A CA and one bundle per party under `out_dir`; returns the bundle dirs. Refuses to write
    over an existing `out_dir` (it would replace keys parties may already hold)."""
    fed = read_federation(federation_file)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: provisioning again would replace every party's keys")
    ca_key, ca_cert = _ca(fed.name, days)
    (out / "ca").mkdir(parents=True, exist_ok=True)
    _write(out / "ca" / "ca.pem", _pem(ca_cert))
    _write(out / "ca" / "ca.key", _key_pem(ca_key), private=True)
    bundles = []
    for party in [fed.coordinator, *fed.platform_names]:
        key, cert = _issue(party, ca_key, ca_cert, days)
        where = out / party
        where.mkdir(parents=True, exist_ok=True)
        _write(where / "ca.pem", _pem(ca_cert))
        _write(where / "cert.pem", _pem(cert))
        _write(where / "key.pem", _key_pem(key), private=True)
        shutil.copyfile(federation_file, where / "federation.yaml")
        bundles.append(where)
    return bundles


def _ca(federation: str, days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} federation CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(party: str, ca_key, ca_cert, days: int):
    """A key and a certificate naming `party` (subject CN and DNS name), for server and client use."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, party)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(party)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
