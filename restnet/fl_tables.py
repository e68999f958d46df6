"""The table of a federated run's rounds, as `restnet fl run` and `restnet fl simulate` print it."""
from __future__ import annotations

from shared.tables import format_table, pct


def rounds_table(results: dict) -> str:
    """One row per round and variant of a ServerApp's results.json."""
    rows = [[r["round"], r["variant_id"], pct(r["accuracy"]), f"{r['num_updates']}/{r['num_nodes']}",
             r["num_examples"], ", ".join(f"{k} {v}" for k, v in sorted(r["rejected"].items())) or "-",
             r["dropped"], r["failed"], r["update_bytes"]] for r in results["rounds"]]
    return format_table(["round", "variant", "accuracy", "updates", "examples", "rejected", "dropped", "failed",
                         "update bytes"], rows)
