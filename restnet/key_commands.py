"""`restnet keys generate | rotate | id`: the coordinator's signing keys (docs/SECURITY.md)."""
from __future__ import annotations

import time
from pathlib import Path

from shared.errors import ConfigError


def add_parsers(subparsers) -> None:
    k = subparsers.add_parser("keys", help="signing keys: the coordinator signs desired states and manifests",
                              description="Ed25519 key pairs. The coordinator signs with the private key "
                                          "(fleet.signing_key); devices trust the public key (fleet.trusted_keys).")
    sub = k.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    g = sub.add_parser("generate", help="a new key pair: NAME.key (private, mode 0600) and NAME.pub")
    g.add_argument("--out", required=True, help="folder for the two files")
    g.add_argument("--name", default="coordinator", help="file name stem (default: coordinator)")
    g.set_defaults(func=_generate)
    r = sub.add_parser("rotate", help="a successor key pair, and the steps to move the fleet to it",
                       description="Writes coordinator-<UTC time>.key/.pub beside the current key and prints the "
                                   "rotation steps: devices trust both keys while the coordinator switches.")
    r.add_argument("--current", required=True, help="the coordinator's current private key (fleet.signing_key)")
    r.set_defaults(func=_rotate)
    n = sub.add_parser("supernode", help="a device's SuperNode key pair for Flower's node authentication",
                       description="Writes OUT/supernode-ID (private, EC P-384, OpenSSH, mode 0600) and .pub; register "
                                   "the .pub with `restnet fl register`, start the device with --supernode-key.")
    n.add_argument("--out", required=True, help="folder for the key pair")
    n.add_argument("--device", required=True, help="device id (names the files)")
    n.set_defaults(func=_supernode)
    i = sub.add_parser("id", help="the key id of a public or private key file (what signatures name)")
    i.add_argument("key", help="a .pub or .key file")
    i.set_defaults(func=_id)


def _generate(args) -> int:
    from shared.signing import generate_key

    out = Path(args.out)
    kid = generate_key(out / f"{args.name}.key", out / f"{args.name}.pub")
    print(f"key {kid}: private {out / f'{args.name}.key'} (keep it on the coordinator only), "
          f"public {out / f'{args.name}.pub'} (give it to every device)")
    print(f"coordinator: fleet.signing_key: {out / f'{args.name}.key'}")
    print(f"devices:     fleet.trusted_keys: [{out / f'{args.name}.pub'}]  (or restnet device --trusted-key)")
    return 0


def _rotate(args) -> int:
    from shared.signing import generate_key, load_signer

    current = Path(args.current)
    old = load_signer(current)
    name = f"coordinator-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    new_key, new_pub = current.parent / f"{name}.key", current.parent / f"{name}.pub"
    kid = generate_key(new_key, new_pub)
    old_pub = current.with_suffix(".pub")
    print(f"new key {kid} (current {old.key_id}): {new_key}, {new_pub}")
    print("1. devices: add the new public key to fleet.trusted_keys, keeping the current one:")
    print(f"     fleet.trusted_keys: [{old_pub}, {new_pub}]")
    print("   and restart the device agents (they then accept either key).")
    print(f"2. coordinator: set fleet.signing_key: {new_key} and restart it. On start it signs every stored desired")
    print("   state and every manifest again with the new key and republishes the desired states.")
    print(f"3. once every device runs with both keys and step 2 is done: remove {old_pub} from the devices'")
    print(f"   fleet.trusted_keys, then retire {current}.")
    return 0


def _supernode(args) -> int:
    from client.supernode import generate_supernode_key

    key = Path(args.out) / f"supernode-{args.device}"
    if key.exists():
        raise ConfigError(f"{key} exists", "a device keeps its key; remove it to make a new one")
    public = generate_supernode_key(key)
    print(f"{args.device}: private {key} (stays on the device), public {public} (restnet fl register {public} ...)")
    return 0


def _id(args) -> int:
    from shared.signing import key_id, load_public_key, load_signer

    path = Path(args.key)
    try:
        kid = key_id(load_public_key(path))
    except ConfigError:
        kid = load_signer(path).key_id
    print(kid)
    return 0
