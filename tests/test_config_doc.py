"""docs/CONFIG.md documents every fleet-config key with its true default, and nothing that no longer exists.

The key list comes from the dataclasses in shared/config.py (the single source of the defaults); the markdown is
hand-written. A key added to the code without a row in CONFIG.md, a row whose default drifted from the code, or a
row for a key that was removed all fail here, with the key named.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path

import yaml

from shared import config as C

DOC = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"
NO_DEFAULT = object()  # a mapping or list key whose sub-keys are documented one by one


def config_keys() -> dict[str, object]:
    """Every key a fleet-config YAML may hold, as a dotted path (`fleet.devices[].id`), with its default.

    A nested section that always exists (`data.calibration`) is not a key of its own: its leaves are. An optional
    section (`large.train`, default null) is a key, and so are its leaves, with the defaults they take once the
    section is given. A list of records (`fleet.devices`) is a key, and so are the fields of one record (`[]`).
    """
    out: dict[str, object] = {}

    def walk(cls, inst, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            t, value, path = hints[f.name], getattr(inst, f.name), prefix + f.name
            args = typing.get_args(t)
            if typing.get_origin(t) is list and args and dataclasses.is_dataclass(args[0]):
                out[path] = value
                walk(args[0], args[0](), path + "[].")
                continue
            nested = next((a for a in (args or (t,)) if dataclasses.is_dataclass(a)), None)
            if nested is None:
                out[path] = value
            elif value is None:
                out[path] = None
                walk(nested, nested(), path + ".")
            else:
                walk(nested, value, path + ".")

    walk(C.Config, C.Config(), "")
    return out


def documented() -> dict[str, list[str]]:
    """Rows of the key tables: every backticked key in the first cell -> the cells of its row."""
    rows: dict[str, list[str]] = {}
    for line in DOC.read_text().splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for key in re.findall(r"`([^`]+)`", cells[0]):
            assert key not in rows, f"{key} is documented twice in {DOC.name}"
            rows[key] = cells
    return rows


def parse_default(cell: str):
    text = cell.strip()
    if text.startswith("`") and text.endswith("`"):
        text = text[1:-1]
    return yaml.safe_load(text)


def same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def test_config_md_has_the_key_table_header():
    text = DOC.read_text()
    assert "| key | type | default | meaning |" in text, "CONFIG.md tables need the columns key, type, default, meaning"


def test_every_config_key_is_documented():
    keys, rows = config_keys(), documented()
    missing = sorted(k for k in keys if k not in rows)
    assert not missing, f"config keys missing from docs/CONFIG.md: {', '.join(missing)}"


def test_no_documented_key_is_stale():
    keys = config_keys()
    stale = sorted(k for k in documented() if k not in keys)
    assert not stale, f"docs/CONFIG.md documents keys that shared/config.py no longer has: {', '.join(stale)}"


def test_documented_defaults_match_the_code():
    keys, rows = config_keys(), documented()
    wrong = []
    for key, default in keys.items():
        cells = rows.get(key)
        if cells is None:
            continue  # reported by test_every_config_key_is_documented
        assert len(cells) >= 4, f"row of {key} needs 4 cells: key | type | default | meaning"
        got = parse_default(cells[2])
        if not same(got, default):
            wrong.append(f"{key}: doc says {cells[2]}, code says {default!r}")
    assert not wrong, "docs/CONFIG.md defaults differ from shared/config.py:\n" + "\n".join(wrong)


def test_every_row_has_a_meaning():
    empty = sorted(k for k, cells in documented().items() if len(cells) < 4 or not cells[3])
    assert not empty, f"rows without a meaning in docs/CONFIG.md: {', '.join(empty)}"


def test_key_walk_sees_nested_and_optional_sections():
    keys = config_keys()
    for key in ("fleet.broker.url", "large.train", "large.train.epochs", "catalog.finetune.epochs",
                "fleet.devices", "fleet.devices[].memory_mb", "federated.partition.alpha"):
        assert key in keys
    assert keys["catalog.finetune.epochs"] == C.CatalogConfig().finetune.epochs
    assert keys["large.train"] is None and keys["large.train.epochs"] == C.TrainConfig().epochs
