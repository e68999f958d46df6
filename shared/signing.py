"""Ed25519 signatures on what the coordinator tells devices: desired states and manifests.

The chain a device checks: a public key it was provisioned with -> the signature on its desired state (which names
the manifest by sha256) -> the manifest's sha256 -> each block's sha256. Whoever can publish on the broker or
answer HTTP without the coordinator's private key can make a device install nothing.

- A desired state carries `key_id` and `sig` beside its fields; the signature covers the payload without those two
  members in canonical JSON (`canonical`): sorted keys, no whitespace, ASCII only, so signer and verifier need not
  share a serializer's quirks beyond number formatting (documented in docs/PROTOCOL.md with a test vector).
- A manifest is signed over its exact bytes; the signature lives beside it (`<manifest>.sig`, JSON).
- A key is named by `key_id`, the first 16 hex digits of the sha256 of its raw public bytes. A device may trust
  several keys at once (a rotation: old and new), each in a PEM file.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import ConfigError, IntegrityError

SIGNATURE_FIELDS = ("key_id", "sig")


class SignatureError(IntegrityError):
    """Something a device was told is unsigned, signed by a key it does not trust, or altered after signing."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def canonical(obj: dict) -> bytes:
    """The bytes a signature on a JSON object covers: sorted keys, no whitespace, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


@dataclass(frozen=True)
class Signer:
    """The coordinator's private key."""

    private: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        return key_id(self.private.public_key())

    def sign(self, data: bytes) -> dict:
        return {"key_id": self.key_id, "sig": base64.b64encode(self.private.sign(data)).decode()}

    def sign_object(self, obj: dict) -> dict:
        """`obj` with its signature members added."""
        return {**obj, **self.sign(canonical(obj))}


@dataclass(frozen=True)
class Verifier:
    """The public keys a device trusts, by key id."""

    keys: dict[str, Ed25519PublicKey]

    def verify(self, data: bytes, signature: dict) -> None:
        if not isinstance(signature, dict) or not all(isinstance(signature.get(f), str) for f in SIGNATURE_FIELDS):
            raise SignatureError("not signed", "the coordinator must sign with fleet.signing_key")
        kid = signature["key_id"]
        if kid not in self.keys:
            raise SignatureError(f"signed by key {kid[:16]!r}, which this device does not trust",
                                 f"trusted keys: {', '.join(sorted(self.keys))}")
        try:
            self.keys[kid].verify(base64.b64decode(signature["sig"], validate=True), data)
        except (InvalidSignature, binascii.Error, ValueError):
            raise SignatureError(f"the signature by key {kid} does not match the content") from None

    def open_object(self, obj: dict) -> dict:
        """`obj` without its signature members, once they verify."""
        content = {k: v for k, v in obj.items() if k not in SIGNATURE_FIELDS}
        self.verify(canonical(content), {f: obj.get(f) for f in SIGNATURE_FIELDS})
        return content


def generate_key(private_path: Path, public_path: Path) -> str:
    """A new key pair: the private key readable by its owner only (PKCS#8 PEM), the public key (PEM) to give to
    devices. Refuses to overwrite either file. Returns the key id."""
    private_path, public_path = Path(private_path), Path(public_path)
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists", "keys are never overwritten: choose another name or remove it")
    private = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id(private.public_key())


def load_signer(path: str | Path) -> Signer:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the signing key {path}: {exc}",
                          "create one with `restnet keys generate`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key", "create one with `restnet keys generate`")
    return Signer(key)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the public key {path}: {exc}",
                          "give the .pub file `restnet keys generate` wrote") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key", "give the .pub file `restnet keys generate` wrote")
    return key


def load_verifier(paths: list[str]) -> Verifier | None:
    """The keys in `paths`, or None when there are none (the device then takes unsigned instructions)."""
    if not paths:
        return None
    keys = [load_public_key(p) for p in paths]
    return Verifier({key_id(k): k for k in keys})
