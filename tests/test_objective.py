"""The eager reference loss against independent formulations (docs/design.md, "The objective")."""

import pytest
import torch
import torch.nn.functional as F

from fastmsd.objective import msd_loss_reference


def unit(*shape, dtype=torch.float64, gen=None):
    return F.normalize(torch.randn(*shape, dtype=dtype, generator=gen), dim=-1)


def make_inputs(b=6, d=8, q=20, n_valid=20, p=17, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img, txt = unit(b, d, dtype=dtype, gen=g), unit(b, d, dtype=dtype, gen=g)
    ring_img, ring_txt = unit(q, d, dtype=dtype, gen=g), unit(q, d, dtype=dtype, gen=g)
    pos = (torch.arange(b) + p) % q
    assert bool((pos < n_valid).all())
    return img, txt, ring_img[pos], ring_txt[pos], ring_img, ring_txt, pos


def row_formula(q, q_m, bank, pos, tau, alpha):
    """l_i = LSE(s_i) - alpha * sum_j pi_ij s_ij - (1 - alpha) s_i,pos (docs/design.md, "The objective")."""
    s = q @ bank.T / tau
    pi = torch.softmax(q_m @ bank.T / tau, dim=-1)
    return torch.logsumexp(s, -1) - alpha * (pi * s).sum(-1) - (1 - alpha) * s[torch.arange(len(pos)), pos]


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("tau", [0.001, 0.07, 0.5])
def test_matches_row_formula(alpha, tau):
    img, txt, img_m, txt_m, ring_img, ring_txt, pos = make_inputs()
    n_valid, divisor = 20, 11
    got = msd_loss_reference(img, txt, img_m, txt_m, ring_img, ring_txt, pos, n_valid, tau, alpha, divisor)
    want = (row_formula(img, img_m, ring_txt, pos, tau, alpha).sum()
            + row_formula(txt, txt_m, ring_img, pos, tau, alpha).sum()) / (2 * divisor)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_parts_are_the_contrastive_and_distillation_cross_entropies(alpha):
    """output_dict: (1 - alpha) CE(onehot) and alpha CE(teacher), each from its own formula."""
    img, txt, img_m, txt_m, ring_img, ring_txt, pos = make_inputs()
    tau, divisor = 0.07, 11
    got = msd_loss_reference(img, txt, img_m, txt_m, ring_img, ring_txt, pos, 20, tau, alpha, divisor,
                             output_dict=True)
    rows = torch.arange(len(pos))

    def parts(q, q_m, bank):
        log_p = torch.log_softmax(q @ bank.T / tau, dim=-1)
        pi = torch.softmax(q_m @ bank.T / tau, dim=-1)
        return -(1 - alpha) * log_p[rows, pos].sum(), -alpha * (pi * log_p).sum()

    (c1, d1), (c2, d2) = parts(img, img_m, ring_txt), parts(txt, txt_m, ring_img)
    torch.testing.assert_close(got["contrastive"], (c1 + c2) / (2 * divisor))
    torch.testing.assert_close(got["distillation"], (d1 + d2) / (2 * divisor))
    torch.testing.assert_close(got["contrastive"] + got["distillation"], got["loss"].detach())


def test_alpha_zero_current_batch_is_clip_loss():
    b, d = 8, 16
    g = torch.Generator().manual_seed(1)
    img, txt = unit(b, d, gen=g, dtype=torch.float32), unit(b, d, gen=g, dtype=torch.float32)
    tau = 0.07
    # A ring holding only the current batch, at rows 0..b-1.
    ring_img, ring_txt = torch.zeros(32, d), torch.zeros(32, d)
    ring_img[:b], ring_txt[:b] = img, txt
    pos = torch.arange(b)
    loss = msd_loss_reference(img, txt, img, txt, ring_img, ring_txt, pos, b, tau, alpha=0.0)
    logits = img @ txt.T / tau
    labels = torch.arange(b)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(loss, clip, rtol=1e-6, atol=1e-6)


def test_unwritten_slots_take_no_part():
    img, txt, img_m, txt_m, ring_img, ring_txt, pos = make_inputs(q=30, n_valid=20, p=3)
    ref = msd_loss_reference(img, txt, img_m, txt_m, ring_img, ring_txt, pos, 20, 0.07, 0.4)
    ring_img, ring_txt = ring_img.clone(), ring_txt.clone()
    ring_img[20:], ring_txt[20:] = float("nan"), 1e6
    got = msd_loss_reference(img, txt, img_m, txt_m, ring_img, ring_txt, pos, 20, 0.07, 0.4)
    torch.testing.assert_close(got, ref)


def test_positive_is_the_ring_column_not_the_row_index():
    img, txt, img_m, txt_m, ring_img, ring_txt, pos = make_inputs(p=17)  # wraps: 17, 18, 19, 0, 1, 2
    got = msd_loss_reference(img, txt, img_m, txt_m, ring_img, ring_txt, pos, 20, 0.1, 0.0)
    want = (F.cross_entropy(img @ ring_txt.T / 0.1, pos, reduction="sum")
            + F.cross_entropy(txt @ ring_img.T / 0.1, pos, reduction="sum")) / (2 * len(pos))
    torch.testing.assert_close(got, want)


def test_gradients_match_closed_forms():
    """dL/dv = sum_k (P - y)_k R[k] / (N tau), dL/dtau = -sum_k (P - y)_k s_k / (N tau)."""
    img, txt, img_m, txt_m, ring_img, ring_txt, pos = make_inputs()
    img.requires_grad_(True)
    tau = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    alpha, n = 0.4, 9
    loss = msd_loss_reference(img, txt, img_m, txt_m, ring_img, ring_txt, pos, 20, tau, alpha, n)
    loss.backward()
    with torch.no_grad():
        t = tau.detach()
        def dlogits(q, q_m, bank):
            s = q @ bank.T / t
            y = alpha * torch.softmax(q_m @ bank.T / t, -1)
            y[torch.arange(len(pos)), pos] += 1 - alpha
            return (torch.softmax(s, -1) - y) / n, s
        g_i, s_i = dlogits(img, img_m, ring_txt)
        g_t, s_t = dlogits(txt, txt_m, ring_img)
        want_img = 0.5 * g_i @ ring_txt / t
        want_tau = 0.5 * (-(g_i * s_i).sum() - (g_t * s_t).sum()) / t
    torch.testing.assert_close(img.grad, want_img)
    torch.testing.assert_close(tau.grad, want_tau)


def test_bad_shapes_are_value_errors():
    img, txt, img_m, txt_m, ring_img, ring_txt, pos = make_inputs()
    with pytest.raises(ValueError, match="n_valid"):
        msd_loss_reference(img, txt, img_m, txt_m, ring_img, ring_txt, pos, 0, 0.07, 0.4)
    with pytest.raises(ValueError, match="width"):
        msd_loss_reference(img[:, :4], txt, img_m, txt_m, ring_img, ring_txt, pos, 20, 0.07, 0.4)


def test_loss_and_ema_selection(monkeypatch):
    from fastmsd.config import ConfigError
    from fastmsd.momentum import ema_update, select_ema
    from fastmsd.objective import select_loss

    cpu = torch.device("cpu")
    assert select_loss("auto", cpu) is msd_loss_reference and select_loss("eager", cpu) is msd_loss_reference
    assert select_ema("auto", cpu) is ema_update and select_ema("foreach", cpu) is ema_update
    choices = ((select_loss, "--loss-impl", "eager"), (select_ema, "--ema-impl", "foreach"))
    for select, option, eager in choices:
        with pytest.raises(ConfigError, match=f"unknown {option} 'fused' \\(auto, triton or {eager}\\)"):
            select("fused", cpu)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ConfigError, match=f"{option} triton needs a CUDA device"):
            select("triton", cpu)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert select("triton", cpu) not in (msd_loss_reference, ema_update)
