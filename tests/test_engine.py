"""Exact large-batch accumulation, naive mode, tau clamp, alpha ramp, schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastmsd.engine import Batch, alpha_at, lr_factor
from fastmsd.model import checkpointed_blocks
from tests.conftest import micro_config
from tests.helpers import make_engine, rel_err


def make_batch(cfg, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    s, L = cfg.model.image_size, cfg.model.max_len
    lengths = torch.randint(4, L + 1, (n,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]
    ids = torch.randint(5, cfg.model.vocab_size, (n, L), generator=g) * mask
    return Batch(torch.randn(n, 1, s, s, generator=g), ids, mask)


def prefill(engine, ptr, n_valid, seed=2):
    g = torch.Generator().manual_seed(seed)
    rings = engine.rings
    rings.img.copy_(F.normalize(torch.randn(rings.img.shape, generator=g), dim=-1))
    rings.txt.copy_(F.normalize(torch.randn(rings.txt.shape, generator=g), dim=-1))
    rings.ptr, rings.n_valid = ptr, n_valid


def grads(engine):
    return {name: p.grad.clone() for name, p in engine.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("ptr,n_valid", [(50, 64), (16, 16)])  # wrapping full ring; filling ring
def test_exact_accumulation_equals_one_large_batch(ptr, n_valid):
    batch = make_batch(micro_config(), 32)
    results = {}
    for micro in (8, 32):
        cfg = micro_config(micro_batch_size=micro, alpha=0.4)
        engine = make_engine(cfg)
        prefill(engine, ptr, n_valid)
        engine.accumulate_gradients(batch)
        results[micro] = (grads(engine), engine.rings.img.clone(), engine.rings.n_valid)
    g4, g1 = results[8][0], results[32][0]
    assert g4.keys() == g1.keys() and "tau" in g1 and len(g1) > 20
    for name in g1:
        assert rel_err(g4[name], g1[name]) <= 1e-5, name
    assert torch.equal(results[8][1], results[32][1])
    assert results[8][2] == results[32][2] == min(64, n_valid + 32)


def test_naive_accumulation_differs():
    batch = make_batch(micro_config(), 32)
    cfg_exact = micro_config(micro_batch_size=32, alpha=0.4)
    exact = make_engine(cfg_exact)
    prefill(exact, 50, 64)
    exact.accumulate_gradients(batch)
    naive = make_engine(micro_config(micro_batch_size=8, alpha=0.4, accum_mode="naive"))
    prefill(naive, 50, 64)
    naive.accumulate_gradients(batch)
    g_exact, g_naive = grads(exact), grads(naive)
    errors = [rel_err(g_naive[name], g_exact[name]) for name in g_exact]
    assert max(errors) > 1e-2
    # Both write all 32 keys at the same rows, but naive micro-batches saw only earlier keys.
    assert naive.rings.n_valid == exact.rings.n_valid


def test_step_clamps_tau_advances_ring_and_updates_momentum():
    cfg = micro_config(micro_batch_size=16)
    engine = make_engine(cfg)
    before = engine.teacher.flat.clone()
    with torch.no_grad():
        engine.model.tau.fill_(0.0005)  # below the clamp
    terms, grad_norm = engine.train_step(make_batch(cfg, 32))
    assert math.isfinite(terms["loss"].item()) and math.isfinite(grad_norm.item())
    # The logged parts add up to the loss (alpha 0.4: both are present).
    assert terms["contrastive"] > 0 and terms["distillation"] > 0
    torch.testing.assert_close(terms["contrastive"] + terms["distillation"], terms["loss"])
    assert cfg.model.tau_min <= engine.model.tau.item() <= cfg.model.tau_max
    assert engine.rings.ptr == 32 and engine.rings.n_valid == 32 and engine.step == 1
    expected = before + (1 - cfg.model.ema_decay) * (engine.student_flat - before)
    torch.testing.assert_close(engine.teacher.flat, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        engine.model.tau.fill_(3.0)
    engine.train_step(make_batch(cfg, 32, seed=5))
    assert engine.model.tau.item() == pytest.approx(cfg.model.tau_max)
    assert engine.rings.ptr == 0  # 64 % 64


def test_keys_in_the_ring_are_the_momentum_embeddings():
    cfg = micro_config()
    engine = make_engine(cfg)
    batch = make_batch(cfg, 32)
    engine.rings.ptr = engine.rings.n_valid = 40
    engine.encode_keys(batch)
    with torch.no_grad():
        want = engine.model.momentum.tower.encode_image(batch.images)
    rows = (40 + torch.arange(32)) % 64
    torch.testing.assert_close(engine.rings.img[rows], want, rtol=1e-5, atol=1e-6)
    assert engine.rings.n_valid == 64


def test_alpha_ramps_linearly_from_zero():
    assert alpha_at(0, 0.4, 100) == 0.0
    assert alpha_at(50, 0.4, 100) == pytest.approx(0.2)
    assert alpha_at(100, 0.4, 100) == pytest.approx(0.4)
    assert alpha_at(1000, 0.4, 100) == pytest.approx(0.4)
    assert alpha_at(0, 0.4, 0) == 0.4


def test_lr_warmup_then_cosine():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0, abs=1e-12)


def test_cpu_rejects_half_precision():
    with pytest.raises(ValueError, match="CUDA"):
        make_engine(micro_config(precision="bf16"))


def test_activation_checkpointing_keeps_gradients():
    batch = make_batch(micro_config(), 32)
    results = []
    for checkpointing in ("none", "all", "image=2,text=1"):
        engine = make_engine(micro_config(micro_batch_size=16, checkpointing=checkpointing))
        student = engine.model.student
        expected = {"none": (0, 0), "all": (4, 1), "image=2,text=1": (2, 1)}[checkpointing]
        assert (sum(checkpointed_blocks(student.image_encoder)),
                sum(checkpointed_blocks(student.text_encoder))) == expected
        prefill(engine, 10, 64)
        engine.accumulate_gradients(batch)
        results.append(grads(engine))
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for name in results[0]:
            assert rel_err(other[name], results[0][name]) <= 1e-5, name


def test_triton_loss_trains_like_the_eager_loss():
    """A few steps of the engine with the fused kernel (interpreter) and with the reference."""
    batches = [make_batch(micro_config(), 32, seed=s) for s in range(3)]
    engines = {}
    for impl in ("eager", "triton"):
        cfg = micro_config(micro_batch_size=16, alpha=0.4, loss_impl=impl, dot_precision="ieee")
        engine = make_engine(cfg)
        prefill(engine, 50, 64)
        for batch in batches:
            engine.train_step(batch)
        engines[impl] = engine
    eager, triton = engines["eager"], engines["triton"]
    assert triton.loss.fused and not eager.loss.fused
    torch.testing.assert_close(triton.student_flat, eager.student_flat, rtol=0, atol=1e-6)
    torch.testing.assert_close(triton.teacher.flat, eager.teacher.flat, rtol=0, atol=1e-6)
    torch.testing.assert_close(triton.model.tau, eager.model.tau, rtol=1e-5, atol=0)
    assert not torch.equal(eager.student_flat, make_engine(micro_config()).student_flat)  # it trained


def test_bf16_teacher_shadow_follows_the_ema(monkeypatch):
    """Under bf16 the keys phase runs a bf16 teacher whose weights the EMA rewrites each step.
    (CPU autocast stands in for CUDA here; the Triton EMA runs in the interpreter.)"""
    import fastmsd.engine as engine_module

    monkeypatch.setattr(engine_module, "resolve_precision", lambda precision, device: "bf16")
    for ema_impl in ("foreach", "triton"):
        engine = make_engine(micro_config(micro_batch_size=16, ema_impl=ema_impl))
        teacher = engine.teacher
        assert teacher.encoder is not teacher.tower
        assert all(p.dtype == torch.bfloat16 for p in teacher.encoder.parameters())
        engine.train_step(make_batch(micro_config(), 32))
        assert torch.equal(teacher.shadow_flat, teacher.flat.to(torch.bfloat16)), ema_impl
        weights = torch.cat([p.detach().reshape(-1) for p in teacher.encoder.parameters()])
        assert torch.equal(weights, teacher.shadow_flat)  # the tower's weights are the shadow
        assert engine.rings.img.dtype == torch.float32 and engine.rings.n_valid == 32
        # The shadow is not saved: loading the fp32 weights re-derives it.
        saved = {k: v.clone() for k, v in engine.model.state_dict().items()}
        assert not any(k.startswith("momentum.") and v.dtype == torch.bfloat16 for k, v in saved.items())
        teacher.flat.add_(1.0)
        teacher.shadow_flat.zero_()
        engine.model.load_state_dict(saved)
        assert torch.equal(teacher.shadow_flat, teacher.flat.to(torch.bfloat16))
        assert torch.equal(teacher.flat, torch.cat([saved[k].reshape(-1) for k in saved
                                                    if k.startswith("momentum.")]))


@pytest.mark.parametrize("sdpa", [True, False])
def test_bf16_teacher_takes_the_attention_switch(monkeypatch, sdpa):
    """--no-sdpa reaches all three towers, the bf16 teacher copy included."""
    import fastmsd.engine as engine_module

    monkeypatch.setattr(engine_module, "resolve_precision", lambda precision, device: "bf16")
    engine = make_engine(micro_config(sdpa=sdpa))
    want = "sdpa" if sdpa else "eager"
    for tower in (engine.model.student, engine.teacher.tower, engine.teacher.encoder):
        assert tower.text_encoder.config._attn_implementation == want


def test_triton_ema_matches_the_torch_ema():
    engines = {}
    for impl in ("foreach", "triton"):
        engine = make_engine(micro_config(micro_batch_size=16, ema_impl=impl))
        engine.train_step(make_batch(micro_config(), 32))
        engines[impl] = engine
    torch.testing.assert_close(engines["triton"].teacher.flat, engines["foreach"].teacher.flat,
                               rtol=0, atol=1e-7)


def test_fast_path_switches_keep_gradients():
    """--compile, --no-sdpa, and trimmed reports change how, not what, the step computes."""
    from fastmsd.data.text import trim_reports

    batch = make_batch(micro_config(), 32)
    ids, mask = trim_reports(batch.input_ids, batch.attention_mask)
    trimmed = Batch(batch.images, ids, mask)
    results = {}
    for name, switches, data in (("reference", {}, batch), ("compile", {"compile": True}, batch),
                                 ("eager attention", {"sdpa": False}, batch), ("trimmed", {}, trimmed)):
        engine = make_engine(micro_config(micro_batch_size=16, **switches))
        prefill(engine, 10, 64)
        engine.accumulate_gradients(data)
        results[name] = grads(engine)
    reference = results.pop("reference")
    for name, result in results.items():
        for key, g in reference.items():
            # Key biases get no gradient in exact arithmetic (softmax ignores a per-row shift):
            # their ~1e-11 rounding noise is compared absolutely.
            if g.norm() < 1e-8:
                assert (result[key] - g).norm() < 1e-8, (name, key)
            else:
                assert rel_err(result[key], g) <= 1e-5, (name, key)


def test_trim_reports_keeps_the_longest_report():
    from fastmsd.data.text import trim_reports

    mask = torch.arange(32)[None] < torch.tensor([3, 9, 5])[:, None]
    ids = torch.arange(96).reshape(3, 32) * mask
    assert trim_reports(ids, mask)[0].shape == (3, 16)  # the longest, 9, rounded up to 8s
    cut_ids, cut_mask = trim_reports(ids, mask, multiple=4)
    assert cut_ids.shape == (3, 12) and torch.equal(cut_mask.sum(1), mask.sum(1))
    assert torch.equal(cut_ids, ids[:, :12])
