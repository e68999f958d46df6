"""The names and patterns every part of the fleet must agree on, each defined once.

Configs, MQTT messages, the HTTP routes, the catalog, the Flower apps and the training code all use these; none
of them spells a pattern or a list of choices out again. No torch here: the config, the messages and a
ClientApp answering a query import this without paying for torch.
"""
from __future__ import annotations

import re

# ---- identifiers ----------------------------------------------------------------------------------------------

DEVICE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # one MQTT topic level (no '/', '+', '#'): ACLs bind to it
TOKEN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # request, assignment and agent version ids
VARIANT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # catalog ids join two timm names and two cut points
SHA256 = re.compile(r"[0-9a-f]{64}")  # lower-case hex, as blob names and manifest digests are written


# A request id a device orders: "<sequence>.<random>", the sequence counting up per device (kept on its disk), so
# a coordinator can tell which of two enrollments the device made later. Any other token stays unordered.
ORDERED_REQUEST = re.compile(r"([0-9]{1,15})\.[A-Za-z0-9_-]{1,48}")


def request_sequence(request_id: str) -> int | None:
    match = ORDERED_REQUEST.fullmatch(request_id)
    return int(match.group(1)) if match else None


def valid_device_id(device_id: object) -> bool:
    return isinstance(device_id, str) and DEVICE_ID.fullmatch(device_id) is not None


def valid_variant_id(variant_id: object) -> bool:
    return isinstance(variant_id, str) and VARIANT_ID.fullmatch(variant_id) is not None


def valid_sha256(digest: object) -> bool:
    return isinstance(digest, str) and SHA256.fullmatch(digest) is not None


# ---- model building and training ------------------------------------------------------------------------------

DIRECTIONS = ("slow_to_fast", "fast_to_slow")  # front = the larger model, or the smaller
BUDGET_METRICS = ("params", "flops", "memory", "latency")
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
STITCH_INITS = ("least_squares", "random")
# CKA between blocks (`shared.cka`): minibatch unbiased HSIC, or the paper's biased HSIC averaged over repeats
CKA_ESTIMATORS = ("unbiased", "paper")
AUGMENTATIONS = ("none", "shift", "shift+flip")
# The paper's fine-tuning strategies and the parts of a stitched model each one trains.
TRAINABLE_PARTS = {
    "stitch": ("stitch",),
    "stitch+behind": ("stitch", "behind"),
    "stitch+front": ("stitch", "front"),
    "full": ("front", "stitch", "behind"),
}
STRATEGIES = tuple(TRAINABLE_PARTS)
# `restnet experiment NAME`: the paper's Table III, Table IV, Fig. 4 and Fig. 5 (`shared.experiments`)
EXPERIMENTS = ("directions", "strategies", "cka-vs-accuracy", "heatmaps")

# ---- federated fine-tuning ------------------------------------------------------------------------------------

AGGREGATIONS = ("fedavg", "trimmed_mean", "median")
PARTITIONS = ("iid", "dirichlet")
# How devices send their change to a stitch (`shared.updates`): fleet-config name -> the format id on the wire.
FLOAT16 = "delta-float16/1"
INT8 = "delta-int8/1"
UPDATE_FORMATS = {"float16": FLOAT16, "int8": INT8}
