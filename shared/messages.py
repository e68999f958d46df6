"""MQTT message schemas of the fleet protocol (docs/PROTOCOL.md): topics, payloads, strict validation.

Every payload is a JSON object carrying `"v": 1`, the schema version. Messages from devices are hostile until
validated: size first, then JSON, then version, then every field (unknown fields are rejected), then the device id
in the payload against the one in the topic. A rejection is a `MessageError` whose `code` goes back to the device
on its error topic and into a metrics label, so codes are a small fixed set.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass

SCHEMA_VERSION = 1
TOPIC_ROOT = "fleet/v1"
MAX_PAYLOAD_BYTES = 4096  # device -> coordinator messages; well below the broker's own limit
KINDS = ("enroll", "desired", "status", "state", "heartbeat", "error")
STATUS_STATES = ("DOWNLOADING", "VERIFIED", "INSTALLED", "FAILED")
ERROR_CODES = ("oversize", "malformed_json", "unknown_version", "schema", "id_mismatch", "bad_topic")

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOKEN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_VARIANT = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # catalog ids join two timm names
_SHA256 = re.compile(r"[0-9a-f]{64}")


class MessageError(Exception):
    """A rejected message: `code` (one of ERROR_CODES) for machines, the text for people."""

    def __init__(self, code: str, message: str, request_id: str | None = None):
        # The text may quote the sender's input and travels back in an error reply: keep it printable and short.
        message = "".join(c if c.isprintable() else "?" for c in message)[:1024]
        super().__init__(message)
        self.code, self.message, self.request_id = code, message, request_id


def valid_variant_id(variant_id: str) -> bool:
    return isinstance(variant_id, str) and _VARIANT.fullmatch(variant_id) is not None


def valid_device_id(device_id: str) -> bool:
    """Device ids are one MQTT topic level (no '/', '+', '#') so broker ACLs can bind to them."""
    return isinstance(device_id, str) and _ID.fullmatch(device_id) is not None


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


@dataclass(frozen=True)
class Profile:
    memory_mb: float  # MiB the device can give the model (inference + fine-tuning)
    compute: float  # speed relative to the catalog's reference CPU (2.0 = twice as fast)
    latency_ms: float | None = None  # per-example inference latency the device needs, if any
    agent_version: str = "0"


@dataclass(frozen=True)
class Enroll:
    device_id: str
    request_id: str
    profile: Profile


@dataclass(frozen=True)
class Assignment:
    variant_id: str
    variant_version: int
    manifest_url: str
    manifest_sha256: str
    total_bytes: int


@dataclass(frozen=True)
class Refusal:
    message: str
    smallest: dict  # {"variant_id", "memory_mb", "compute"}: what the least demanding variant needs


@dataclass(frozen=True)
class Desired:
    """The coordinator's retained word on what a device should run; `version` only ever increases."""

    device_id: str
    version: int
    assignment_id: str
    request_id: str | None  # the enrollment this answers
    assignment: Assignment | None
    refusal: Refusal | None


@dataclass(frozen=True)
class Status:
    device_id: str
    assignment_id: str
    state: str
    variant_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Presence:
    device_id: str
    online: bool
    seq: int  # connection generation: a later connection has a higher seq


@dataclass(frozen=True)
class Heartbeat:
    device_id: str
    seq: int


@dataclass(frozen=True)
class ErrorReply:
    code: str
    message: str
    request_id: str | None = None


# ---- encoding --------------------------------------------------------------------------------------------

def encode(msg) -> bytes:
    """Any message dataclass -> compact JSON bytes with the schema version."""
    return json.dumps({"v": SCHEMA_VERSION, **asdict(msg)}, separators=(",", ":"), allow_nan=False).encode()


# ---- decoding --------------------------------------------------------------------------------------------

def decode(kind: str, topic_device_id: str, payload: bytes):
    """Validate a payload received on `fleet/v1/dev/{topic_device_id}/{kind}` and return its dataclass."""
    if kind not in _DECODERS:
        raise MessageError("bad_topic", f"devices do not publish {kind!r} messages")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MessageError("oversize", f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise MessageError("malformed_json", f"payload is not JSON: {str(exc)[:80]}") from None
    if not isinstance(data, dict):
        raise MessageError("schema", "payload must be a JSON object")
    rid = data.get("request_id")
    rid = rid if isinstance(rid, str) and _TOKEN.fullmatch(rid) else None
    if "v" not in data:
        raise MessageError("schema", "missing schema version field 'v'", rid)
    if data["v"] != SCHEMA_VERSION or isinstance(data["v"], bool):
        raise MessageError("unknown_version", f"schema version {str(data['v'])[:20]!r} is not supported "
                           f"(this coordinator speaks {SCHEMA_VERSION})", rid)
    try:
        msg = _DECODERS[kind](_Fields(data, kind))
    except _Invalid as exc:
        raise MessageError("schema", f"{kind}: {exc}", rid) from None
    if msg.device_id != topic_device_id:
        raise MessageError("id_mismatch", f"payload device_id {msg.device_id!r} differs from the topic's "
                           f"{topic_device_id!r}", rid)
    return msg


class _Invalid(ValueError):
    pass


class _Fields:
    """Typed access to a payload's fields that records which ones were read, to reject the rest."""

    def __init__(self, data: dict, where: str, top: bool = True):
        self.data, self.where, self.seen = data, where, {"v"} if top else set()

    def _get(self, name: str, optional: bool):
        self.seen.add(name)
        if name not in self.data or self.data[name] is None:
            if optional:
                return None
            raise _Invalid(f"field {name!r} is required")
        return self.data[name]

    def token(self, name: str, pattern=_TOKEN, optional: bool = False) -> str | None:
        value = self._get(name, optional)
        if value is not None and not (isinstance(value, str) and pattern.fullmatch(value)):
            raise _Invalid(f"field {name!r} must match {pattern.pattern}")
        return value

    def text(self, name: str, limit: int, optional: bool = False) -> str | None:
        value = self._get(name, optional)
        if value is not None and not (isinstance(value, str) and len(value) <= limit and value.isprintable()):
            raise _Invalid(f"field {name!r} must be printable text of at most {limit} characters")
        return value

    def number(self, name: str, low: float, high: float, optional: bool = False) -> float | None:
        value = self._get(name, optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low < value <= high:
            raise _Invalid(f"field {name!r} must be a number in ({low:g}, {high:g}]")
        return float(value)

    def integer(self, name: str, low: int, high: int, optional: bool = False) -> int | None:
        value = self._get(name, optional)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise _Invalid(f"field {name!r} must be an integer in [{low}, {high}]")
        return value

    def boolean(self, name: str) -> bool:
        value = self._get(name, False)
        if not isinstance(value, bool):
            raise _Invalid(f"field {name!r} must be true or false")
        return value

    def choice(self, name: str, options: tuple[str, ...]) -> str:
        value = self._get(name, False)
        if value not in options:
            raise _Invalid(f"field {name!r} must be one of {', '.join(options)}")
        return value

    def nested(self, name: str, optional: bool = False) -> "_Fields | None":
        value = self._get(name, optional)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise _Invalid(f"field {name!r} must be an object")
        return _Fields(value, f"{self.where}.{name}", top=False)

    def done(self):
        extra = sorted(map(str, set(self.data) - self.seen))
        if extra:
            raise _Invalid(f"unknown field(s) {', '.join(map(repr, extra))[:80]}")


_MAX_INT = 2**53  # JSON numbers beyond this lose precision in other languages


def _device_id(f: _Fields) -> str:
    return f.token("device_id", _ID)


def _enroll(f: _Fields) -> Enroll:
    p = f.nested("profile")
    profile = Profile(p.number("memory_mb", 0, 1e9), p.number("compute", 0, 1e6),
                      p.number("latency_ms", 0, 1e9, optional=True), p.token("agent_version"))
    p.done()
    msg = Enroll(_device_id(f), f.token("request_id"), profile)
    f.done()
    return msg


def _desired(f: _Fields) -> Desired:
    a, r = f.nested("assignment", optional=True), f.nested("refusal", optional=True)
    if (a is None) == (r is None):
        raise _Invalid("exactly one of 'assignment' and 'refusal' must be given")
    assignment = refusal = None
    if a is not None:
        assignment = Assignment(a.token("variant_id", _VARIANT), a.integer("variant_version", 1, _MAX_INT),
                                a.text("manifest_url", 2048), a.token("manifest_sha256", _SHA256),
                                a.integer("total_bytes", 0, _MAX_INT))
        a.done()
    if r is not None:
        smallest = r._get("smallest", False)
        if not isinstance(smallest, dict):
            raise _Invalid("refusal.smallest must be an object")
        refusal = Refusal(r.text("message", 1024), smallest)
        r.done()
    msg = Desired(_device_id(f), f.integer("version", 1, _MAX_INT), f.token("assignment_id"),
                  f.token("request_id", optional=True), assignment, refusal)
    f.done()
    return msg


def _status(f: _Fields) -> Status:
    msg = Status(_device_id(f), f.token("assignment_id"), f.choice("state", STATUS_STATES),
                 f.token("variant_id", _VARIANT, optional=True), f.text("reason", 512, optional=True))
    f.done()
    return msg


def _presence(f: _Fields) -> Presence:
    msg = Presence(_device_id(f), f.boolean("online"), f.integer("seq", 0, _MAX_INT))
    f.done()
    return msg


def _heartbeat(f: _Fields) -> Heartbeat:
    msg = Heartbeat(_device_id(f), f.integer("seq", 0, _MAX_INT))
    f.done()
    return msg


def _error(f: _Fields) -> ErrorReply:
    msg = ErrorReply(f.choice("code", ERROR_CODES), f.text("message", 1024), f.token("request_id", optional=True))
    f.done()
    return msg


def decode_error(payload: bytes) -> ErrorReply:
    """Errors carry no device id (the topic names the device); devices use this to read them."""
    return _decode_plain("error", payload, _error)


def decode_desired(device_id: str, payload: bytes) -> Desired:
    """Desired states are not size-limited like device input, but are validated just as strictly."""
    msg = _decode_plain("desired", payload, _desired)
    if msg.device_id != device_id:
        raise MessageError("id_mismatch", f"desired state for {msg.device_id!r} received by {device_id!r}")
    return msg


def _decode_plain(kind: str, payload: bytes, decoder):
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        raise MessageError("malformed_json", f"{kind} payload is not JSON") from None
    if not isinstance(data, dict) or data.get("v") != SCHEMA_VERSION:
        raise MessageError("unknown_version", f"{kind} payload has no supported schema version")
    try:
        return decoder(_Fields(data, kind))
    except _Invalid as exc:
        raise MessageError("schema", f"{kind}: {exc}") from None


_DECODERS = {"enroll": _enroll, "status": _status, "state": _presence, "heartbeat": _heartbeat}
