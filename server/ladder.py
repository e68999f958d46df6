"""Which rungs a device with a storage budget holds: its assignment (the top rung) and, below it, the smaller
variants of the accuracy/size frontier whose additional blocks still fit the budget.

The frontier: among the variants the device could run (memory and compute fit), those no smaller variant beats
on expected accuracy; a variant that is both bigger and no better is never worth a switch. Going down from the
top, a rung is taken when the blocks it adds (blobs the ladder does not hold yet: variants of one catalog share
front and behind blocks) fit what is left of the budget; a rung that does not fit is skipped and a smaller one
may still fit. Storage counts every blob of the ladder once, the top rung's included.
"""
from __future__ import annotations

from server.assignment import MIB, Assigner, expected_score
from shared.catalog import VariantRecord
from shared.messages import Profile


def ladder(assigner: Assigner, top: VariantRecord, profile: Profile,
           blocks: dict[str, dict[str, int]]) -> list[VariantRecord]:
    """The rungs, top first, each needing less memory than the one above. `blocks`: variant id -> {sha256: size}."""
    budget = (profile.storage_mb or 0) * MIB
    held = dict(blocks[top.id])
    rungs = [top]
    for rec in reversed(frontier(assigner, profile, below=assigner.needs[top.id].memory_mb)):
        extra = {sha: size for sha, size in blocks[rec.id].items() if sha not in held}
        if sum(held.values()) + sum(extra.values()) <= budget:
            rungs.append(rec)
            held.update(extra)
    return rungs


def frontier(assigner: Assigner, profile: Profile, below: float) -> list[VariantRecord]:
    """Variants the device can run that need less than `below` MiB, smallest first, each better than all smaller."""
    runnable = [r for r in assigner.variants if assigner.fits(r, profile) and assigner.needs[r.id].memory_mb < below]
    runnable.sort(key=lambda r: (assigner.needs[r.id].memory_mb, -expected_score(r), r.id))
    out: list[VariantRecord] = []
    for rec in runnable:
        if not out or (expected_score(rec) > expected_score(out[-1])
                       and assigner.needs[rec.id].memory_mb > assigner.needs[out[-1].id].memory_mb):
            out.append(rec)
    return out
