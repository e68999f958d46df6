"""MQTT message schemas of the fleet protocol (docs/PROTOCOL.md): topics, payloads, strict validation.

Every payload is a JSON object carrying `"v"`, the schema version: 1, or 2 for what a ladder adds (a storage budget
in the profile, rungs in the desired state, a SWITCHED status); a message is written in the lowest version that
can carry it, so a device without a storage budget sends and receives exactly the version-1 bytes. Messages from devices are hostile until
validated: size first, then JSON, then version, then every field (pydantic, strict: unknown fields rejected, a bool
is not a number, numbers finite and in range, texts printable and bounded), then the device id in the payload
against the one in the topic. A rejection is a `MessageError` whose `code` goes back to the device on its error
topic and into a metrics label, so codes are a small fixed set.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, field
from typing import Annotated, Literal

from pydantic import ConfigDict, PlainValidator, StrictBool, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from shared.signing import SIGNATURE_FIELDS, Signer, Verifier
from shared.vocabulary import DEVICE_ID, SHA256, TOKEN, VARIANT_ID, valid_device_id

SCHEMA_VERSION = 1  # what every message without ladder fields is written in
SCHEMA_VERSIONS = (1, 2)
MAX_RUNGS = 8  # a ladder is short: a device switches between a few sizes, not the whole catalog
TOPIC_ROOT = "fleet/v1"
MAX_PAYLOAD_BYTES = 4096  # device -> coordinator messages; well below the broker's own limit
MAX_INT = 2**53 - 1  # integers stay below 2^53: beyond it JSON numbers lose precision in other languages
KINDS = ("enroll", "desired", "status", "state", "heartbeat", "error")
# The most a PUBLISH packet adds to its payload on a fleet topic: fixed header (1 + 4 bytes of remaining length),
# topic length (2) and the longest topic, packet id (2), MQTT 5 property length (1).
PUBLISH_OVERHEAD = 5 + 2 + len(f"{TOPIC_ROOT}/dev/") + 64 + 1 + max(map(len, KINDS)) + 2 + 1
STATUS_STATES = ("DOWNLOADING", "VERIFIED", "INSTALLED", "FAILED", "SWITCHED")  # SWITCHED: version 2
ERROR_CODES = ("oversize", "malformed_json", "unknown_version", "schema", "id_mismatch", "bad_topic", "internal")


class MessageError(Exception):
    """A rejected message: `code` (one of ERROR_CODES) for machines, the text for people."""

    def __init__(self, code: str, message: str, request_id: str | None = None):
        # The text may quote the sender's input and travels back in an error reply: keep it printable and short.
        message = "".join(c if c.isprintable() else "?" for c in message)[:1024]
        super().__init__(message)
        self.code, self.message, self.request_id = code, message, request_id


def topic(device_id: str, kind: str) -> str:
    if not valid_device_id(device_id) or kind not in KINDS:
        raise ValueError(f"no topic for device {device_id!r} kind {kind!r}")
    return f"{TOPIC_ROOT}/dev/{device_id}/{kind}"


def parse_topic(name: str) -> tuple[str, str]:
    """`fleet/v1/dev/{id}/{kind}` -> (id, kind); anything else is a `bad_topic` MessageError."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{TOPIC_ROOT}/dev" or parts[4] not in KINDS \
            or not valid_device_id(parts[3]):
        raise MessageError("bad_topic", f"not a fleet topic: {name[:120]!r}")
    return parts[3], parts[4]


# ---- field types: each rule once, with the text a rejection carries -----------------------------------------

def _field(kind: str, text: str, accept):
    """A field type whose check is `accept(value)` (the converted value, or None to reject) and whose rejection
    says `text`: "field 'profile.memory_mb' must be a number in (0, 1e+09]"."""
    def check(value):
        accepted = accept(value)
        if accepted is None:
            raise PydanticCustomError(kind, "{text}", {"text": text})
        return accepted
    return PlainValidator(check)


def _matching(pattern: re.Pattern):
    return Annotated[str, _field("pattern", f"must match {pattern.pattern}",
                                 lambda v: v if isinstance(v, str) and pattern.fullmatch(v) else None)]


def _number(low: float, high: float):
    def accept(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        try:
            value = float(value)  # an integer too large for a float is out of range, not a crash
        except OverflowError:
            return None
        return value if math.isfinite(value) and low < value <= high else None
    return Annotated[float, _field("range", f"must be a number in ({low:g}, {high:g}]", accept)]


def _integer(low: int, high: int):
    return Annotated[int, _field("range", f"must be an integer in [{low}, {high}]",
                                 lambda v: v if isinstance(v, int) and not isinstance(v, bool)
                                 and low <= v <= high else None)]


def _text(limit: int):
    return Annotated[str, _field("text", f"must be printable text of at most {limit} characters",
                                 lambda v: v if isinstance(v, str) and len(v) <= limit and v.isprintable()
                                 else None)]


DeviceId = _matching(DEVICE_ID)
Token = _matching(TOKEN)
VariantId = _matching(VARIANT_ID)
Sha256 = _matching(SHA256)
Count = _integer(0, MAX_INT)
Version = _integer(1, MAX_INT)
MemoryMB = _number(0, 1e9)
StorageMB = _number(0, 1e9)
ComputeScore = _number(0, 1e6)
LatencyMs = _number(0, 1e9)
Reason = _text(512)
Message = _text(1024)
Url = _text(2048)

# Unknown fields are rejected; NaN and infinities are not numbers.
_message = dataclass(frozen=True, config=ConfigDict(extra="forbid", allow_inf_nan=False))


@_message
class Profile:
    memory_mb: MemoryMB  # MiB the device can give the model (inference + fine-tuning)
    compute: ComputeScore  # speed relative to the catalog's reference CPU (2.0 = twice as fast)
    latency_ms: LatencyMs | None = None  # per-example inference latency the device needs, if any
    agent_version: Token = field(kw_only=True)  # required, also where the latency target is left out
    storage_mb: StorageMB | None = field(default=None, kw_only=True)  # version 2: MiB for a ladder's blocks


@_message
class Enroll:
    device_id: DeviceId
    request_id: Token
    profile: Profile


@_message
class Assignment:
    variant_id: VariantId
    variant_version: Version
    manifest_url: Url
    manifest_sha256: Sha256
    total_bytes: Count


@_message
class Rung:
    """One rung of a ladder: delivered like an assignment, plus the memory the coordinator says it needs (MiB,
    inference + fine-tuning + margin), which is what the device compares with the memory it has now."""

    variant_id: VariantId
    variant_version: Version
    manifest_url: Url
    manifest_sha256: Sha256
    total_bytes: Count
    memory_mb: MemoryMB


@_message
class Refusal:
    message: Message
    smallest: dict  # {"variant_id", "memory_mb", "compute"}: what the least demanding variant needs


@_message
class Desired:
    """The coordinator's retained word on what a device should run; `version` only ever increases."""

    device_id: DeviceId
    version: Version
    assignment_id: Token
    request_id: Token | None  # the enrollment this answers
    assignment: Assignment | None
    refusal: Refusal | None
    rungs: list[Rung] | None = None  # version 2: the ladder, top rung (= assignment) first, memory decreasing

    @model_validator(mode="after")
    def _one_outcome(self):
        if (self.assignment is None) == (self.refusal is None):
            raise PydanticCustomError("outcome", "exactly one of 'assignment' and 'refusal' must be given")
        if self.rungs is not None:
            _check_rungs(self.rungs, self.assignment)
        return self


def _check_rungs(rungs: list[Rung], top: Assignment | None) -> None:
    """A ladder a device can follow: its first rung is the assignment, no variant twice, each rung needs less
    memory than the one above it (so 'the best rung that fits' is the first that fits)."""
    def bad(text: str):
        raise PydanticCustomError("rungs", "{text}", {"text": text})
    if top is None or not 1 <= len(rungs) <= MAX_RUNGS:
        bad(f"'rungs' must list 1 to {MAX_RUNGS} rungs beside an assignment")
    first = rungs[0]
    if (first.variant_id, first.variant_version, first.manifest_url, first.manifest_sha256) != \
            (top.variant_id, top.variant_version, top.manifest_url, top.manifest_sha256):
        bad("the first rung must be the assignment")
    if len({r.variant_id for r in rungs}) != len(rungs):
        bad("a variant appears twice in 'rungs'")
    if any(lower.memory_mb >= upper.memory_mb for upper, lower in zip(rungs, rungs[1:])):
        bad("'rungs' must need strictly less memory from one rung to the next")


@_message
class Status:
    device_id: DeviceId
    assignment_id: Token
    state: Literal[STATUS_STATES]
    variant_id: VariantId | None = None  # for SWITCHED: the rung the device runs now
    reason: Reason | None = None

    @model_validator(mode="after")
    def _switched_names_rung(self):
        if self.state == "SWITCHED" and self.variant_id is None:
            raise PydanticCustomError("rungs", "a SWITCHED status must name the rung in 'variant_id'")
        return self


@_message
class Presence:
    device_id: DeviceId
    online: StrictBool
    seq: Count  # connection generation: a later connection has a higher seq


@_message
class Heartbeat:
    device_id: DeviceId
    seq: Count


@_message
class ErrorReply:
    code: Literal[ERROR_CODES]
    message: Message
    request_id: Token | None = None


_FROM_DEVICES = {"enroll": TypeAdapter(Enroll), "status": TypeAdapter(Status), "state": TypeAdapter(Presence),
                 "heartbeat": TypeAdapter(Heartbeat)}
_DESIRED, _ERROR = TypeAdapter(Desired), TypeAdapter(ErrorReply)


# ---- encoding --------------------------------------------------------------------------------------------

def version_of(msg) -> int:
    """The lowest schema version that carries `msg`: 2 when it uses what a ladder added, else 1."""
    if isinstance(msg, Enroll):
        return 2 if msg.profile.storage_mb is not None else 1
    if isinstance(msg, Desired):
        return 2 if msg.rungs is not None else 1
    if isinstance(msg, Status):
        return 2 if msg.state == "SWITCHED" else 1
    return 1


def encode(msg, signer: Signer | None = None) -> bytes:
    """Any message -> compact JSON bytes in the lowest schema version that carries it (version-1 messages exactly
    as before ladders); signed (`key_id`, `sig`) when a signer is given (the signature covers the rungs too)."""
    obj = {"v": version_of(msg), **asdict(msg)}
    if obj["v"] == 1:  # version 1 has no such members at all
        obj.pop("rungs", None)
        if isinstance(obj.get("profile"), dict):
            obj["profile"].pop("storage_mb", None)
    if signer is not None:
        obj = signer.sign_object(obj)
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


# ---- decoding --------------------------------------------------------------------------------------------

def decode(kind: str, topic_device_id: str, payload: bytes):
    """Validate a payload received on `fleet/v1/dev/{topic_device_id}/{kind}` and return its message."""
    if kind not in _FROM_DEVICES:
        raise MessageError("bad_topic", f"devices do not publish {kind!r} messages")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MessageError("oversize", f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    data = _parse(payload)
    if not isinstance(data, dict):
        raise MessageError("schema", "payload must be a JSON object")
    rid = data.get("request_id")
    rid = rid if isinstance(rid, str) and TOKEN.fullmatch(rid) else None
    _check_version(data, rid)
    msg = _validate(_FROM_DEVICES[kind], kind, data, rid)
    _check_version_fits(kind, data["v"], msg, rid)
    if msg.device_id != topic_device_id:
        raise MessageError("id_mismatch", f"payload device_id {msg.device_id!r} differs from the topic's "
                           f"{topic_device_id!r}", rid)
    return msg


def decode_error(payload: bytes) -> ErrorReply:
    """Errors carry no device id (the topic names the device); devices use this to read them."""
    return _validate(_ERROR, "error", _plain("error", payload))


def decode_desired(device_id: str, payload: bytes, verifier: Verifier | None = None) -> Desired:
    """Desired states are not size-limited like device input, but are validated just as strictly. With a
    verifier (the device's trusted keys) the signature must verify first (SignatureError otherwise); without one,
    signature members are ignored."""
    data = _plain("desired", payload)
    content = verifier.open_object(data) if verifier is not None else \
        {k: v for k, v in data.items() if k not in SIGNATURE_FIELDS}
    msg = _validate(_DESIRED, "desired", content)
    _check_version_fits("desired", data["v"], msg, None)
    if msg.device_id != device_id:
        raise MessageError("id_mismatch", f"desired state for {msg.device_id!r} received by {device_id!r}")
    return msg


def _plain(kind: str, payload: bytes) -> dict:
    data = _parse(payload)
    if not isinstance(data, dict):
        raise MessageError("schema", f"{kind} payload must be a JSON object")
    _check_version(data, None)
    return data


def _parse(payload: bytes):
    """JSON as the protocol defines it: UTF-8 without a byte-order mark (the JSON parser refuses one), no key twice
    in an object (readers that keep the first and readers that keep the last would see different messages), no NaN
    or Infinity (not JSON)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError("malformed_json", "payload is not UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:
        raise MessageError("malformed_json", f"payload is not JSON: {str(exc)[:80]}") from None


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice[:40]!r} appears twice in one object")
    return data


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON number")


def _check_version(data: dict, request_id: str | None) -> None:
    """`v` is a JSON integer this side speaks: another integer is a version this side does not speak, anything
    else is no version."""
    v = data.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        raise MessageError("schema", "field 'v' (the schema version) must be an integer", request_id)
    if v not in SCHEMA_VERSIONS:
        raise MessageError("unknown_version", f"schema version {str(v)[:20]} is not supported "
                           f"(this side speaks {', '.join(map(str, SCHEMA_VERSIONS))})", request_id)


def _check_version_fits(kind: str, v: int, msg, request_id: str | None) -> None:
    """A version-1 payload carries no ladder fields and a version-2 payload carries them: one meaning per version."""
    if version_of(msg) != v:
        need = {"enroll": "'profile.storage_mb'", "desired": "'rungs'", "status": "state SWITCHED"}.get(kind, "")
        raise MessageError("schema", f"{kind}: schema version {v} " + (f"requires {need}" if v == 2 else
                           f"has no {need}: that is version 2"), request_id)


def _validate(adapter: TypeAdapter, kind: str, data: dict, request_id: str | None = None):
    """The message a payload's fields make, or a `schema` MessageError naming the first bad field."""
    fields = {k: v for k, v in data.items() if k != "v"}
    try:
        return adapter.validate_python(fields)
    except ValidationError as exc:
        raise MessageError("schema", f"{kind}: {_describe(exc)}", request_id) from None


def _describe(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    field = ".".join(str(p) for p in first["loc"])
    kind = first["type"]
    if kind == "unexpected_keyword_argument":
        extra = sorted(".".join(str(p) for p in e["loc"]) for e in errors if e["type"] == kind)
        return f"unknown field(s) {', '.join(map(repr, extra))[:80]}"
    if kind in ("missing", "missing_argument") or first.get("input", ...) is None:
        return f"field {field!r} is required"
    if kind in ("pattern", "range", "text", "outcome", "rungs"):
        return f"field {field!r} {first['msg']}" if field else first["msg"]
    if kind == "bool_type":
        return f"field {field!r} must be true or false"
    if kind == "literal_error":
        return f"field {field!r} must be one of {first['ctx']['expected']}"
    if kind in ("dataclass_type", "dict_type", "dataclass_args_type"):
        return f"field {field!r} must be an object"
    if kind == "string_type":
        return f"field {field!r} must be text"
    return f"field {field!r}: {first['msg']}"
