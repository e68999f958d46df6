"""Which variant a device gets: the best expected accuracy among the variants its profile can hold and run.

Memory: a variant needs `(memory_bytes + finetune_memory_bytes) * (1 + margin)` (inference and stitch-only
fine-tuning both happen on the device; the margin absorbs measurement error and the rest of the device's work),
compared with the device's reported `memory_mb` (MiB).

Compute: the catalog's `latency_ms` was measured on the reference CPU (compute score 1.0); on a device it is
`latency_ms / compute`. When a device states a latency target, that must be <= the target, i.e. the device needs a
compute score of at least `latency_ms / target`. A variant without a measured latency is estimated from its FLOPs
at the catalog's own FLOPs-per-millisecond (the median over measured variants; DEFAULT_FLOPS_PER_MS when none
is measured). Without a latency target, compute does not exclude any variant.

Storage (only for a device that states `storage_mb`): a variant's blocks (its manifest's total bytes) must fit the
budget, or the device could not hold even that one rung (`server.ladder` fills the rest of the budget).
"""
from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass

from shared.catalog import VariantRecord
from shared.messages import Profile, Refusal

MIB = 1 << 20
DEFAULT_FLOPS_PER_MS = 1e7  # 10 GFLOP/s: a modest CPU core, used only when the catalog measured no latency


@dataclass(frozen=True)
class Needs:
    variant_id: str
    memory_mb: float  # inference + fine-tuning, with the margin
    latency_ms: float  # on the reference CPU (measured, or estimated from FLOPs)

    def compute_for(self, latency_target_ms: float | None) -> float | None:
        """The compute score a device needs to meet its latency target (None: no target, no need). Finite even
        for a target so small that the quotient overflows: the largest float then says "out of reach"."""
        if latency_target_ms is None:
            return None
        return min(self.latency_ms / latency_target_ms, sys.float_info.max)


def expected_score(rec: VariantRecord) -> float:
    """The catalog's expected accuracy, with undefined values ranked last."""
    value = rec.expected_accuracy
    return value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


class Assigner:
    """Ranks a catalog's variants once; answers `choose(profile)` for any number of devices."""

    def __init__(self, variants: list[VariantRecord], memory_margin: float, sizes: dict[str, int] | None = None):
        """`sizes`: each variant's bytes of blocks (for devices with a storage budget; unknown counts as 0)."""
        measured = [r.flops / r.latency_ms for r in variants if r.latency_ms and r.latency_ms > 0 and r.flops > 0]
        self.flops_per_ms = statistics.median(measured) if measured else DEFAULT_FLOPS_PER_MS
        self.margin = memory_margin
        self.sizes = sizes or {}
        self.variants = sorted(variants, key=lambda r: (-expected_score(r), r.params, r.id))
        self.needs = {r.id: self._needs(r) for r in self.variants}

    def _needs(self, rec: VariantRecord) -> Needs:
        memory = (rec.memory_bytes + rec.finetune_memory_bytes) * (1 + self.margin) / MIB
        latency = rec.latency_ms if rec.latency_ms and rec.latency_ms > 0 else rec.flops / self.flops_per_ms
        return Needs(rec.id, memory, latency)

    def fits(self, rec: VariantRecord, profile: Profile) -> bool:
        need = self.needs[rec.id]
        if need.memory_mb > profile.memory_mb:
            return False
        if profile.storage_mb is not None and self.sizes.get(rec.id, 0) > profile.storage_mb * MIB:
            return False
        compute = need.compute_for(profile.latency_ms)
        return compute is None or compute <= profile.compute

    def choose(self, profile: Profile) -> VariantRecord | Refusal:
        """The best variant that fits, else a refusal naming what the least demanding variant needs."""
        for rec in self.variants:
            if self.fits(rec, profile):
                return rec
        return self.refusal(profile)

    def refusal(self, profile: Profile) -> Refusal:
        if not self.variants:
            return Refusal("no variant fits: the catalog is empty", {"variant_id": None, "memory_mb": None,
                                                                       "compute": None})
        need = min(self.needs.values(), key=lambda n: (n.memory_mb, n.latency_ms, n.variant_id))
        compute = need.compute_for(profile.latency_ms)
        wants = f"{need.memory_mb:.1f} MiB (inference + fine-tuning + {self.margin:.0%} margin)"
        offers = f"{profile.memory_mb:.1f} MiB"
        if compute is not None:
            wants += f" and compute >= {compute:.3g} for a {profile.latency_ms:g} ms latency target"
            offers += f" and compute {profile.compute:g}"
        if profile.storage_mb is not None:
            wants += f" and {self.sizes.get(need.variant_id, 0) / MIB:.3g} MiB of storage"
            offers += f" and {profile.storage_mb:g} MiB of storage"
        return Refusal(f"no variant fits: the smallest, {need.variant_id}, needs {wants}; the device offers {offers}",
                       {"variant_id": need.variant_id, "memory_mb": round(need.memory_mb, 3),
                        "compute": None if compute is None else round(compute, 6)})
