"""Development TLS material for the compose fleet: a private CA, server certificates, SuperNode keys.

    python docker/tls/gen_certs.py --out DIR [--host NAME ...] [--device ID ...]

Writes into DIR (existing files are kept, so running it twice changes nothing):
  ca.crt, ca.key                 a private certificate authority (EC P-256, 5 years)
  <host>.crt, <host>.key         one server certificate per --host (default: mosquitto, coordinator, superlink),
                                 valid for that name, localhost and 127.0.0.1, signed by the CA (2 years)
  supernode-<id>, .pub           one SuperNode authentication key pair per --device (EC P-384, OpenSSH format,
                                 as `flower-supernode --auth-supernode-private-key` and `flwr supernode register`
                                 expect)
Private keys are readable by their owner only. This is for trying TLS out; in production use your
organisation's CA and keep private keys on the machine that uses them (see docs/DEPLOY.md).
Needs only `cryptography`, which Flower already depends on.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("mosquitto", "coordinator", "superlink")


def _write(path: Path, data: bytes, private: bool) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ReStNet Fleet (development)"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def ensure_ca(out: Path):
    crt, key = out / "ca.crt", out / "ca.key"
    if crt.exists() and key.exists():
        return (x509.load_pem_x509_certificate(crt.read_bytes()),
                serialization.load_pem_private_key(key.read_bytes(), None))
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder()
          .subject_name(_name("ReStNet Fleet development CA")).issuer_name(_name("ReStNet Fleet development CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=5 * 365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    _write(key, _pem_key(ca_key), private=True)
    _write(crt, ca.public_bytes(serialization.Encoding.PEM), private=False)
    return ca, ca_key


def ensure_server(out: Path, host: str, ca, ca_key) -> None:
    crt, key = out / f"{host}.crt", out / f"{host}.key"
    if crt.exists() and key.exists():
        return
    now = dt.datetime.now(dt.timezone.utc)
    server_key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(host), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder()
            .subject_name(_name(host)).issuer_name(ca.subject)
            .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2 * 365))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(key, _pem_key(server_key), private=True)
    _write(crt, cert.public_bytes(serialization.Encoding.PEM), private=False)


def ensure_supernode_key(out: Path, device_id: str) -> None:
    private, public = out / f"supernode-{device_id}", out / f"supernode-{device_id}.pub"
    if private.exists() and public.exists():
        return
    key = ec.generate_private_key(ec.SECP384R1())
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH) + b"\n", private=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--host", action="append", help=f"server name (repeatable; default: {', '.join(DEFAULT_HOSTS)})")
    p.add_argument("--device", action="append", default=[], help="device id for a SuperNode key pair (repeatable)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ca, ca_key = ensure_ca(out)
    for host in args.host or DEFAULT_HOSTS:
        ensure_server(out, host, ca, ca_key)
    for device_id in args.device:
        ensure_supernode_key(out, device_id)
    print(f"TLS material in {out}: ca.crt, " + ", ".join(f"{h}.crt" for h in args.host or DEFAULT_HOSTS)
          + "".join(f", supernode-{d}" for d in args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
