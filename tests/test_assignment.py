"""Assignment rules: best expected accuracy that fits memory (with margin) and the latency target."""
from __future__ import annotations

from server.assignment import DEFAULT_FLOPS_PER_MS, MIB, Assigner
from shared.catalog import VariantRecord
from shared.messages import Profile, Refusal


def rec(vid: str, mem_mb: float, ft_mb: float, latency: float | None, acc: float | None, params: int = 1000,
        flops: int = 10**7, cka: float = 0.5) -> VariantRecord:
    return VariantRecord(vid, "a", "b", 1, 1, "slow_to_fast", cka, "cnn->cnn", params, flops, int(mem_mb * MIB),
                         int(ft_mb * MIB), 10, latency, accuracy=acc)


VARIANTS = [rec("small", 8, 4, 2.0, 0.7), rec("mid", 24, 8, 5.0, 0.8), rec("large", 64, 16, 12.0, 0.9)]


def choose(profile: Profile, variants=VARIANTS, margin: float = 0.2):
    return Assigner(variants, margin).choose(profile)


def test_memory_counts_inference_finetuning_and_margin():
    assert choose(Profile(96.0, 1.0, agent_version="test")).id == "large"  # (64 + 16) * 1.2 = 96 exactly
    assert choose(Profile(95.9, 1.0, agent_version="test")).id == "mid"
    assert choose(Profile(38.4, 1.0, agent_version="test")).id == "mid"
    assert choose(Profile(14.4, 1.0, agent_version="test")).id == "small"
    assert choose(Profile(80.0, 1.0, agent_version="test"), margin=0.0).id == "large"


def test_latency_target_bounds_compute():
    # large needs 12 ms / compute <= 10 ms -> compute >= 1.2
    assert choose(Profile(500, 1.2, 10.0, agent_version="test")).id == "large"
    assert choose(Profile(500, 1.1, 10.0, agent_version="test")).id == "mid"
    assert choose(Profile(500, 0.1, None, agent_version="test")).id == "large"  # no target: compute does not exclude


def test_flops_stand_in_for_unmeasured_latency():
    measured = rec("m", 1, 1, 4.0, 0.5, flops=4 * 10**7)  # 10^7 FLOPs per ms on the reference CPU
    unmeasured = rec("u", 1, 1, None, 0.9, flops=8 * 10**7)  # estimated 8 ms
    assert choose(Profile(100, 1.0, 8.0, agent_version="test"), [measured, unmeasured]).id == "u"
    assert choose(Profile(100, 1.0, 7.9, agent_version="test"), [measured, unmeasured]).id == "m"
    lone = rec("lone", 1, 1, None, 0.9, flops=int(DEFAULT_FLOPS_PER_MS * 3))
    assert choose(Profile(100, 1.0, 3.0, agent_version="test"), [lone]).id == "lone"
    assert isinstance(choose(Profile(100, 1.0, 2.9, agent_version="test"), [lone]), Refusal)


def test_ties_go_to_fewer_parameters_and_unknown_accuracy_falls_back_to_cka():
    a, b = rec("a", 1, 1, 1.0, 0.8, params=2000), rec("b", 1, 1, 1.0, 0.8, params=1000)
    assert choose(Profile(100, 1, agent_version="test"), [a, b]).id == "b"
    c, d = rec("c", 1, 1, 1.0, None, cka=0.9), rec("d", 1, 1, 1.0, None, cka=0.6)
    assert choose(Profile(100, 1, agent_version="test"), [d, c]).id == "c"
    nan = rec("nan", 1, 1, 1.0, None, cka=float("nan"))
    assert choose(Profile(100, 1, agent_version="test"), [nan, d]).id == "d"


def test_refusal_states_the_smallest_needs():
    r = choose(Profile(10.0, 1.0, agent_version="test"))
    assert isinstance(r, Refusal)
    assert r.smallest == {"variant_id": "small", "memory_mb": 14.4, "compute": None}
    assert "small" in r.message and "14.4 MiB" in r.message and "10.0 MiB" in r.message
    r = choose(Profile(500.0, 0.1, 1.0, agent_version="test"))  # memory fine, too slow for a 1 ms target: small needs compute >= 2
    assert r.smallest["compute"] == 2.0 and "compute >= 2" in r.message
    assert isinstance(Assigner([], 0.2).choose(Profile(1, 1, agent_version="test")), Refusal)


def test_profiles_come_from_the_config_or_a_measurement():
    from client.profile import device_profile
    from shared.config import DeviceConfig

    device = DeviceConfig("d", memory_mb=64, compute=0.5, latency_ms=20.0)
    assert device_profile(device) == Profile(64, 0.5, 20.0, agent_version=device_profile(device).agent_version)
    measured = device_profile(device, measure=True)
    assert measured.memory_mb > 0 and 0 < measured.compute < 1e6 and measured.latency_ms == 20.0
    assert device_profile(None, latency_ms=5.0).latency_ms == 5.0


def test_a_budget_change_worth_re_enrolling():
    from client.profile import budget_changed

    base = Profile(100, 1.0, None, agent_version="x")
    assert not budget_changed(base, Profile(105, 1.2, None, agent_version="x"))  # measurement noise
    assert budget_changed(base, Profile(80, 1.0, None, agent_version="x"))
    assert budget_changed(base, Profile(100, 0.5, None, agent_version="x"))
    assert budget_changed(base, Profile(100, 1.0, 10.0, agent_version="x"))
