"""Checks that only a CUDA device can make. ``bench/gpu_check.sh kernels`` runs them with
FASTMSD_TEST_DEVICE=cuda; everywhere else they are skipped (each has a CPU counterpart: the EMA
formula in test_kernel_ema.py, the no-host-value proxy of the fast path in test_model.py)."""

import pytest
import torch

from tests.conftest import TEST_DEVICE

pytestmark = pytest.mark.skipif(TEST_DEVICE != "cuda", reason="needs a GPU (FASTMSD_TEST_DEVICE=cuda)")


@pytest.mark.parametrize("n", [1, 4097, 10_000_003], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("m", [0.0, 0.5, 0.9, 0.995], ids=lambda m: f"m{m}")
def test_ema_within_one_rounding_of_lerp(n, m):
    """The interpreter's exact formula does not hold here: Triton contracts it to an FMA, like
    torch's CUDA lerp_. So: within one rounding of lerp_, and the bf16 shadow bit-exact."""
    from fastmsd.kernels.ema import ema_update_

    g = torch.Generator(device="cuda").manual_seed(n + int(1000 * m))
    t = torch.randn(n, device="cuda", generator=g)
    s = torch.randn(n, device="cuda", generator=g)
    shadow = torch.full((n,), float("nan"), device="cuda", dtype=torch.bfloat16)
    want = t.clone().lerp_(s, 1 - m)
    bound = 2.0**-21 * (t.abs() + s.abs())
    ema_update_(t, s, m, shadow)
    assert bool(((t - want).abs() <= bound).all()), (t - want).abs().max().item()
    assert torch.equal(shadow, t.to(torch.bfloat16))


def test_keys_and_query_phases_never_synchronise_with_the_host():
    """The fast path's promise, checked by CUDA itself: any synchronising call inside the keys
    and query phases of a step raises. Padded reports on purpose: the attention mask is where
    transformers' SDPA path would ask the device whether any padding exists."""
    from fastmsd.config import preset
    from fastmsd.engine import Batch, Engine
    from fastmsd.model import build_model

    cfg = preset("tiny")
    cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.key_chunk = 128, 32, 64
    engine = Engine(cfg, build_model(cfg.model, cfg.model.vocab_size), "cuda")
    m = cfg.model
    lengths = torch.randint(4, m.max_len + 1, (128,), device="cuda")
    mask = torch.arange(m.max_len, device="cuda")[None] < lengths[:, None]
    batch = Batch(torch.randn(128, 1, m.image_size, m.image_size, device="cuda"),
                  torch.randint(0, m.vocab_size, (128, m.max_len), device="cuda") * mask, mask)
    engine.train_step(batch)  # first calls: compilation, allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.accumulate_gradients(batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
