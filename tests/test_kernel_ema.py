"""The flat EMA kernel in the Triton interpreter (conftest.py sets TRITON_INTERPRET=1)."""

import pytest
import torch

from fastmsd.kernels import ema
from fastmsd.kernels.ema import ema_update_

SIZES = [1, 3, 4095, 4097, 100_003]
MOMENTA = [0.0, 0.5, 0.9, 0.995]


def reference(t: torch.Tensor, s: torch.Tensor, m: float) -> torch.Tensor:
    """torch.lerp's fp32 formulas as separate torch ops, switched at weight 0.5 like lerp."""
    w = torch.tensor(1.0 - m, dtype=torch.float32)
    return t + w * (s - t) if w < 0.5 else s - (s - t) * (1 - w)


def make(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.randn(n, generator=g)


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("m", MOMENTA, ids=lambda m: f"m{m}")
def test_matches_formula_and_lerp(n: int, m: float) -> None:
    t, s = make(n, seed=n + int(1000 * m))
    t_before = t.clone()
    expected = reference(t, s, m)
    lerped = t.clone().lerp_(s, 1.0 - m)
    shadow = torch.full((n,), float("nan"), dtype=torch.bfloat16)
    ema_update_(t, s, m, shadow)
    assert torch.equal(t, expected)
    # torch's vectorised CPU lerp contracts the formula to an FMA (its scalar tail does not), so
    # it may differ by the one rounding of w * (s - t); for m = 0 and 0.5 that product is exact.
    if m in (0.0, 0.5):
        assert torch.equal(t, lerped)
    else:
        assert ((t - lerped).abs() <= 2**-21 * (t_before.abs() + s.abs())).all()
    assert not shadow.isnan().any()
    assert torch.equal(shadow, t.to(torch.bfloat16))


def test_without_shadow_same_momentum() -> None:
    t, s = make(4097, seed=1)
    with_shadow = t.clone()
    ema_update_(with_shadow, s, 0.995, torch.empty(4097, dtype=torch.bfloat16))
    ema_update_(t, s, 0.995)
    assert torch.equal(t, with_shadow)


def test_guard_band_untouched() -> None:
    n, pad = 4097, 1000
    t_big, s_big = make(n + 2 * pad, seed=2)
    t_before = t_big.clone()
    shadow_big = torch.full((n + 2 * pad,), 7.0, dtype=torch.bfloat16)
    shadow_big[pad : pad + n] = float("nan")
    t, s = t_big[pad : pad + n], s_big[pad : pad + n]
    ema_update_(t, s, 0.9, shadow_big[pad : pad + n])
    assert torch.equal(t, reference(t_before[pad : pad + n], s, 0.9))
    for outside in (slice(0, pad), slice(pad + n, None)):
        assert torch.equal(t_big[outside], t_before[outside])
        assert (shadow_big[outside] == 7.0).all()
    assert torch.equal(shadow_big[pad : pad + n], t.to(torch.bfloat16))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the interpreter, on NaN and overflow
def test_shadow_rounds_to_nearest_even() -> None:
    """Ties, subnormals, overflow and random bit patterns; m = 0 makes momentum == student."""
    ulp = 2.0**-7
    special = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + 2**-20, -(1 + ulp / 2),
                            3.4e38, -3.4e38, 0.0, -0.0, 1e-40, -1e-40, 1.5e-45])
    g = torch.Generator().manual_seed(3)
    bits = torch.randint(-(2**31), 2**31, (20_000,), dtype=torch.int64, generator=g)
    s = torch.cat([special, bits.to(torch.int32).view(torch.float32)])
    # m = 0 computes s - (s - t) * 0, which is NaN for an infinite s: non-finite values get
    # their own test below.
    s[~s.isfinite()] = 1.0
    # From -0.0, s - (s - t) * 0 is s bit for bit, -0.0 included (from +0.0 it would be +0.0).
    t = torch.full_like(s, -0.0)
    shadow = torch.empty(s.numel(), dtype=torch.bfloat16)
    ema_update_(t, s, 0.0, shadow)
    assert torch.equal(t.view(torch.int32), s.view(torch.int32))
    assert torch.equal(shadow.view(torch.int16), s.to(torch.bfloat16).view(torch.int16))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the interpreter, on NaN and overflow
def test_non_finite() -> None:
    # NaN payloads that the rounding carry alone would turn into inf, then an overflowing step.
    nans = torch.tensor([0x7F800001, 0x7F807FFF, 0x7FFFFFFF, -1], dtype=torch.int64).to(torch.int32)
    t = torch.cat([torch.zeros(4), torch.tensor([-3.4e38, 3.4e38])])
    s = torch.cat([nans.view(torch.float32), torch.tensor([3.4e38, -3.4e38])])
    shadow = torch.zeros(6, dtype=torch.bfloat16)
    ema_update_(t[:4], s[:4], 0.0, shadow[:4])
    ema_update_(t[4:], s[4:], 0.9, shadow[4:])
    assert shadow[:4].isnan().all()
    assert torch.equal(t[4:], torch.tensor([float("inf"), float("-inf")]))
    assert torch.equal(shadow[4:], t[4:].to(torch.bfloat16))


def test_int64_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    # Buffers of 2**31 elements do not fit this machine: force the int64 path on a small one.
    monkeypatch.setattr(ema, "_INT32_SAFE_NUMEL", 0)
    t, s = make(4097, seed=4)
    expected = reference(t, s, 0.9)
    shadow = torch.empty(4097, dtype=torch.bfloat16)
    ema_update_(t, s, 0.9, shadow)
    assert torch.equal(t, expected)
    assert torch.equal(shadow, t.to(torch.bfloat16))


def test_bumps_versions_like_lerp() -> None:
    t, s = make(10, seed=5)
    shadow = torch.empty(10, dtype=torch.bfloat16)
    versions = t._version, shadow._version
    ema_update_(t, s, 0.9, shadow)
    assert (t._version, shadow._version) == (versions[0] + 1, versions[1] + 1)


def test_empty_is_a_no_op() -> None:
    ema_update_(torch.empty(0), torch.empty(0), 0.9, torch.empty(0, dtype=torch.bfloat16))


def _bad_inputs() -> list:
    # Students of ones, so that a launch that slipped through would change the momentum.
    bf16 = torch.bfloat16
    n = 8
    return [
        pytest.param(torch.zeros(n, dtype=torch.float64), torch.ones(n), 0.9, None, "momentum must be",
                     id="momentum-float64"),
        pytest.param(torch.zeros(n), torch.ones(n, dtype=bf16), 0.9, None, "student must be",
                     id="student-bf16"),
        pytest.param(torch.zeros(n), torch.ones(n + 1), 0.9, None, "student has", id="student-longer"),
        pytest.param(torch.zeros(n, 2).t(), torch.ones(2, n), 0.9, None, "momentum must be contiguous",
                     id="momentum-strided"),
        pytest.param(torch.zeros(n), torch.ones(2 * n)[::2], 0.9, None, "student must be contiguous",
                     id="student-strided"),
        pytest.param(torch.zeros(n), torch.ones(n, device="meta"), 0.9, None, "student is on meta",
                     id="student-on-meta"),
        pytest.param(torch.zeros(n), torch.ones(n), 1.0, None, r"\[0, 1\)", id="m1.0"),
        pytest.param(torch.zeros(n), torch.ones(n), -0.1, None, r"\[0, 1\)", id="m-0.1"),
        pytest.param(torch.zeros(n), torch.ones(n), float("nan"), None, r"\[0, 1\)", id="m-nan"),
        pytest.param(torch.zeros(n), torch.ones(n), 0.9, torch.zeros(n), "shadow must be",
                     id="shadow-float32"),
        pytest.param(torch.zeros(n), torch.ones(n), 0.9, torch.zeros(n - 1, dtype=bf16), "shadow has",
                     id="shadow-shorter"),
        pytest.param(torch.zeros(n), torch.ones(n), 0.9, torch.zeros(2 * n, dtype=bf16)[::2],
                     "shadow must be contig", id="shadow-strided"),
        pytest.param(torch.zeros(n), torch.ones(n), 0.9, torch.zeros(n, dtype=bf16, device="meta"),
                     "shadow is on meta", id="shadow-on-meta"),
    ]


@pytest.mark.parametrize("momentum, student, m, shadow, match", _bad_inputs())
def test_bad_inputs_raise_before_launch(momentum: torch.Tensor, student: torch.Tensor, m: float,
                                        shadow: torch.Tensor | None, match: str) -> None:
    before = momentum.clone()
    shadow_before = None if shadow is None else shadow.clone()
    with pytest.raises(ValueError, match=match):
        ema_update_(momentum, student, m, shadow)
    assert torch.equal(momentum, before)
    if shadow is not None and shadow.device.type == "cpu":
        assert torch.equal(shadow, shadow_before)
