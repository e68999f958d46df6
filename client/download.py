"""Fetch, verify and install a variant into a device folder; nothing half-written is ever current.

Layout of a device folder (what the Flower ClientApp loads):
  blobs/<sha256>     verified blocks (content-addressed, shared between versions and variants)
  partial/<sha256>   a block being downloaded; resumed with `Range` after an interruption
  current.json       the installed variant's manifest bytes, replaced atomically as the very last step
  rungs/<sha256>.json, ladder.json   a ladder's manifests and its rungs in order (`client.ladder_store`), for a device
                     with a storage budget; written after every rung verified, before current.json (the top rung)
A block whose bytes do not hash to its name is deleted and refused, and current.json is left as it was; a stored
block damaged since is fetched again; a ladder with one rung that fails verification changes nothing at all: the
device keeps what it runs.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path

from shared.artifacts import BlobStore, Manifest, atomic_write, sha256_bytes
from shared.errors import IntegrityError
from client.ladder_store import RUNGS_DIR, drop_ladder, write_ladder
from shared.messages import Assignment, Rung
from shared.signing import SignatureError, Verifier

log = logging.getLogger("restnet.download")

CHUNK = 1 << 16
MAX_MANIFEST_BYTES = 16 << 20
MAX_SIGNATURE_BYTES = 4096
TIMEOUT_S = 30.0


class DownloadError(Exception):
    """The coordinator could not be reached or answered with an error; worth retrying later."""


def current_manifest_bytes(device_dir: Path) -> bytes | None:
    path = Path(device_dir) / "current.json"
    return path.read_bytes() if path.is_file() else None


def install(assignment: Assignment, device_dir: Path, ca_file: str | None = None,
            on_verified=None, trusted: Verifier | None = None) -> Manifest:
    """Make `assignment` the device's current variant, downloading only the blocks it lacks. With `trusted`
    keys the manifest's own signature must verify too. A ladder held before is dropped (one variant now)."""
    device_dir = Path(device_dir)
    data, manifest = fetch_verified(assignment, device_dir, ca_file, trusted)
    if on_verified is not None:
        on_verified(manifest)
    atomic_write(device_dir / "current.json", data)
    drop_ladder(device_dir)
    return manifest


def install_ladder(rungs: list[Rung], device_dir: Path, ca_file: str | None = None, on_verified=None,
                   trusted: Verifier | None = None) -> list[Manifest]:
    """Make a ladder the device's: every rung fetched and verified (manifest sha256 and signature, every block)
    before anything is switched; then the rungs' manifests, `ladder.json`, and `current.json` (the top rung)."""
    device_dir = Path(device_dir)
    fetched = [fetch_verified(rung, device_dir, ca_file, trusted) for rung in rungs]
    if on_verified is not None:
        on_verified(fetched[0][1])
    for rung, (data, _) in zip(rungs, fetched):
        atomic_write(device_dir / RUNGS_DIR / f"{rung.manifest_sha256}.json", data)
    write_ladder(device_dir, rungs)
    atomic_write(device_dir / "current.json", fetched[0][0])
    return [m for _, m in fetched]


def fetch_verified(assignment: Assignment | Rung, device_dir: Path, ca_file: str | None = None,
                   trusted: Verifier | None = None) -> tuple[bytes, Manifest]:
    """A variant's manifest bytes and manifest, its blocks in the blob store, everything verified; the device's
    current variant is not touched."""
    context = ssl.create_default_context(cafile=ca_file) if assignment.manifest_url.startswith("https:") else None
    data = _get(assignment.manifest_url, context, limit=MAX_MANIFEST_BYTES)
    if sha256_bytes(data) != assignment.manifest_sha256:
        raise IntegrityError(f"manifest of {assignment.variant_id} does not match the sha256 in the assignment")
    if trusted is not None:
        try:
            signature = json.loads(_get(assignment.manifest_url + ".sig", context, limit=MAX_SIGNATURE_BYTES))
        except ValueError:
            raise SignatureError(f"the signature of the manifest of {assignment.variant_id} is not JSON") from None
        trusted.verify(data, signature)
    manifest = Manifest.from_bytes(data)
    if (manifest.variant_id, manifest.version) != (assignment.variant_id, assignment.variant_version):
        raise IntegrityError(f"manifest is {manifest.variant_id} v{manifest.version}, "
                             f"assigned {assignment.variant_id} v{assignment.variant_version}")
    store = BlobStore(device_dir / "blobs")
    base = assignment.manifest_url.rsplit("/manifests/", 1)[0]
    for block in manifest.blocks:  # every block of the variant verified, including ones already here
        if store.has(block.sha256) and _intact(store, block.sha256):
            continue
        fetch_blob(f"{base}/blobs/{block.sha256}", block.sha256, block.size, store, device_dir / "partial", context)
    return data, manifest


def _intact(store: BlobStore, sha256: str) -> bool:
    """A stored block still hashes to its name; a damaged one (disk, power loss) is deleted, to be fetched again."""
    try:
        store.read(sha256)
        return True
    except IntegrityError:
        log.warning("block %s on disk is damaged: fetching it again", sha256[:12])
        store.path(sha256).unlink(missing_ok=True)
        return False


def fetch_blob(url: str, sha256: str, size: int, store: BlobStore, partial_dir: Path,
               context: ssl.SSLContext | None = None) -> None:
    """Download one block into `store`, resuming a partial file, and verify it before it gets its name."""
    partial_dir.mkdir(parents=True, exist_ok=True)
    part = partial_dir / sha256
    have = part.stat().st_size if part.is_file() else 0
    if have > size:
        part.unlink()
        have = 0
    if have < size:
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context) as resp:
                if resp.status == 200:  # the server sent everything: start over
                    have = 0
                with open(part, "ab" if have else "wb") as fh:
                    while chunk := resp.read1(CHUNK):  # what has arrived: a cut or a kill loses nothing received
                        have += len(chunk)
                        if have > size:
                            break
                        fh.write(chunk)
                        fh.flush()
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # our partial file is not a prefix of theirs
                part.unlink(missing_ok=True)
            raise DownloadError(f"GET {url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise DownloadError(f"GET {url}: {exc!r} after {have} of {size} bytes (will resume)") from None
    if have < size:
        raise DownloadError(f"GET {url}: connection ended after {have} of {size} bytes (will resume)")
    digest = hashlib.sha256()
    with open(part, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
        os.fsync(fh.fileno())  # on disk before it gets its name: a power loss leaves a partial file, not a bad block
    if have != size or digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise IntegrityError(f"block {sha256[:12]} from {url} does not match its sha256 (got {have} of {size} bytes)",
                             "the coordinator's copy is damaged or was tampered with")
    store.root.mkdir(parents=True, exist_ok=True)
    os.replace(part, store.path(sha256))


def _get(url: str, context: ssl.SSLContext | None, limit: int) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as resp:
            data = resp.read(limit + 1)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"GET {url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"GET {url}: {exc!r}") from None
    if len(data) > limit:
        raise IntegrityError(f"{url} is larger than {limit} bytes")
    return data
