"""Key material for a deployment: a CA, the SuperLink's TLS certificate, and one
node-authentication key pair per institution.

    files = generate_certs(Path("deploy-keys"), ["hospital-a", "hospital-b"], hosts=["10.0.0.5"])

writes (private keys mode 0600, every file atomically)::

    DIR/ca.crt, DIR/ca.key                       the CA that signs the SuperLink's certificate
    DIR/superlink.crt, DIR/superlink.key         TLS for the SuperLink (SAN: hosts + 127.0.0.1, localhost)
    DIR/nodes/<institution>.key, .key.pub        EC SECP384R1, OpenSSH format (Flower's node auth)
    DIR/operators/ca.crt, ca.key                 a second CA, for operators only
    DIR/operators/<operator>.crt, .key           an operator's TLS client certificate

`ca.crt` goes to every SuperNode (`--root-certificates`) and to the `flwr`
connection; `ca.key` stays with whoever issues certificates; each institution
keeps its own `nodes/<name>.key` and hands the `.pub` to the coordinator, who
registers it with `flwr supernode register`. The operator CA is separate so that
nothing a node holds opens the Control API: `operators/ca.crt` goes to the
coordinator's control proxy only, `operators/ca.key` stays with the issuer, and
each operator keeps their own `operators/<name>.crt` and `.key`
(`control_proxy`; `write_operator` issues one more later).
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedcl.atomic import write_bytes

# Lowercase letters, digits and dashes: safe as a file name, a compose service
# name and a node-config value.
INSTITUTION_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
VALID_DAYS = 365


class CertError(ValueError):
    """Bad input for certificate generation (names, hosts, output folder)."""


@dataclass(frozen=True)
class DeployFiles:
    """Where `generate_certs` put everything; also how a layout on disk is read back."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink.key"

    def node_key(self, institution: str) -> Path:
        return self.root / "nodes" / f"{institution}.key"

    def node_public_key(self, institution: str) -> Path:
        return self.root / "nodes" / f"{institution}.key.pub"

    @property
    def operator_ca_cert(self) -> Path:
        return self.root / "operators" / "ca.crt"

    @property
    def operator_ca_key(self) -> Path:
        return self.root / "operators" / "ca.key"

    def operator_cert(self, operator: str) -> Path:
        return self.root / "operators" / f"{operator}.crt"

    def operator_key(self, operator: str) -> Path:
        return self.root / "operators" / f"{operator}.key"


def check_institutions(names: list[str], *, what: str = "institution") -> list[str]:
    if not names:
        raise CertError(f"{what}s: give at least one name, e.g. hospital-a,hospital-b")
    for name in names:
        if not INSTITUTION_NAME.match(name) or name == "ca":
            raise CertError(f"{what} {name!r}: use lowercase letters, digits and dashes "
                            "(starting with a letter or digit, at most 63 characters; not 'ca')")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CertError(f"{what}s: {', '.join(duplicates)} given more than once")
    return names


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Atomic write; a private key is created 0600 and never exists with wider rights."""
    write_bytes(path, data, mode=0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, *DEFAULT_HOSTS]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.match(r"^[A-Za-z0-9.-]+$", host):
                raise CertError(f"host {host!r}: not an IP address or a DNS name") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(subject: str, public_key, issuer: str, signer, *, ca: bool,
                 san: x509.SubjectAlternativeName | None = None,
                 client: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                                        critical=False)
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]),
                                        critical=False)
    return builder.sign(signer, hashes.SHA256())


def generate_certs(out: Path, institutions: list[str], *, hosts: list[str] = (),
                   operators: list[str] = ("operator",), overwrite: bool = False) -> DeployFiles:
    """Write a CA, the SuperLink's TLS pair, each institution's auth key pair, the
    operator CA and each operator's client certificate under `out`."""
    check_institutions(list(institutions))
    check_institutions(list(operators), what="operator")
    files = DeployFiles(Path(out))
    san = _san(list(hosts))  # checks the hosts before anything is written
    if files.ca_cert.exists() and not overwrite:
        raise CertError(f"--out {out}: already holds a CA (ca.crt); choose another folder "
                        "or pass --overwrite to replace every key in it")
    if Path(out).exists() and not Path(out).is_dir():
        raise CertError(f"--out {out}: exists and is not a folder")

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _certificate("fedcl CA", ca_key.public_key(), "fedcl CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _certificate("fedcl SuperLink", server_key.public_key(), "fedcl CA", ca_key,
                               ca=False, san=san)
    _write(files.ca_key, _pem_key(ca_key), private=True)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.server_key, _pem_key(server_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    for name in institutions:
        write_node_key(files, name)
    operator_ca_key = ec.generate_private_key(ec.SECP384R1())
    operator_ca = _certificate("fedcl operator CA", operator_ca_key.public_key(), "fedcl operator CA",
                               operator_ca_key, ca=True)
    _write(files.operator_ca_key, _pem_key(operator_ca_key), private=True)
    _write(files.operator_ca_cert, operator_ca.public_bytes(serialization.Encoding.PEM), private=False)
    for name in operators:
        write_operator(files, name)
    return files


def write_operator(files: DeployFiles, operator: str) -> None:
    """An operator's TLS client certificate (EC SECP384R1, clientAuth), signed by the operator CA."""
    check_institutions([operator], what="operator")
    if not files.operator_ca_key.is_file():
        raise CertError(f"{files.operator_ca_key}: no operator CA key here; run "
                        "`fedcl deploy certs` first (or point --out at the folder that holds it)")
    ca_key = serialization.load_pem_private_key(files.operator_ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _certificate(operator, key.public_key(), "fedcl operator CA", ca_key, ca=False, client=True)
    _write(files.operator_key(operator), _pem_key(key), private=True)
    _write(files.operator_cert(operator), cert.public_bytes(serialization.Encoding.PEM), private=False)


def write_node_key(files: DeployFiles, institution: str) -> None:
    """One institution's EC SECP384R1 key pair in OpenSSH format (what Flower's node auth reads)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write(files.node_key(institution), private, private=True)
    _write(files.node_public_key(institution), public + f" {institution}\n".encode(), private=False)
