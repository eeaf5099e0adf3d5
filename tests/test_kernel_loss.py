"""The fused Triton MSD loss against an fp64 evaluation of the reference.

On the CPU (the Triton interpreter) dots are exact fp32; bench/gpu_check.sh reruns this file on a
GPU with FASTMSD_TEST_DEVICE=cuda, where the kernel runs its "ieee" fp32 dots, to the same
tolerances.

The kernel is held to the error that fp32 itself makes, not to one fixed number: at tau = 0.001
the logits are about 1,000, so rounding alone moves a gradient by ~1e-5 relative, and how far
depends on the CPU's float32 paths. Each comparison therefore also runs the eager fp32 reference
on the same inputs and device, and allows the kernel FACTOR times its error against fp64, or
FLOOR (sixteen fp32 epsilons) where the eager error happens to be tiny.
"""

import pytest
import torch
import torch.nn.functional as F

import fastmsd.kernels.msd_loss as kernel
from fastmsd.kernels.msd_loss import msd_loss
from fastmsd.objective import msd_loss_reference
from tests.conftest import TEST_DEVICE

TOL = 1e-5
FACTOR = 8.0
FLOOR = 16 * torch.finfo(torch.float32).eps
NAMES = ("loss", "d_img", "d_txt", "d_tau")


def make_case(b, dim, q, n_valid, p, seed=0, dtype=torch.float32):
    """Unit rows and rings; positives at ring rows (p + i) mod Q; teacher rows near, not equal
    to, the ring keys (they come from an older teacher in general)."""
    g = torch.Generator().manual_seed(seed)

    def unit(n):
        return F.normalize(torch.randn(n, dim, generator=g), dim=-1)

    img, txt, ring_img, ring_txt = unit(b), unit(b), unit(q), unit(q)
    pos = (torch.arange(b) + p) % q
    assert bool((pos < n_valid).all()), "positives must be written slots"
    img_m = F.normalize(ring_img[pos] + 0.3 * unit(b), dim=-1)
    txt_m = F.normalize(ring_txt[pos] + 0.3 * unit(b), dim=-1)
    tensors = [t.to(TEST_DEVICE, dtype) for t in (img, txt, img_m, txt_m, ring_img, ring_txt)]
    return tensors + [pos.to(TEST_DEVICE)]


def losses_and_grads(loss_fn, case, n_valid, tau, alpha, divisor, dtype=None, **kw):
    """``loss_fn`` on ``case`` (cast to ``dtype``): the loss and its gradients for img, txt, tau."""
    img, txt, img_m, txt_m, ring_img, ring_txt, pos = case
    rows = [x.detach().to(dtype or x.dtype) for x in (img, txt, img_m, txt_m, ring_img, ring_txt)]
    a, b = rows[0].clone().requires_grad_(), rows[1].clone().requires_grad_()
    t = torch.tensor(tau, dtype=dtype or torch.float32, device=a.device, requires_grad=True)
    loss = loss_fn(a, b, *rows[2:], pos.to(a.device), n_valid, t, alpha, divisor, **kw)
    loss.backward()
    return [x.detach().cpu() for x in (loss, a.grad, b.grad, t.grad)]


def run_kernel(case, n_valid, tau, alpha, divisor, loss_fn=msd_loss, **kw):
    return losses_and_grads(loss_fn, case, n_valid, tau, alpha, divisor, precision="ieee", **kw)


def references(case, n_valid, tau, alpha, divisor):
    """The reference in fp64 (the truth) and in eager fp32 (the error fp32 itself makes)."""
    want = losses_and_grads(msd_loss_reference, [x.cpu() for x in case], n_valid, tau, alpha, divisor,
                            dtype=torch.float64)
    fp32 = [x.float() if x.is_floating_point() else x for x in case]
    return want, losses_and_grads(msd_loss_reference, fp32, n_valid, tau, alpha, divisor)


def run_both(case, n_valid, tau, alpha, divisor, **kw):
    """(kernel, fp64 reference, eager fp32 reference) on the same inputs."""
    want, eager = references(case, n_valid, tau, alpha, divisor)
    return run_kernel(case, n_valid, tau, alpha, divisor, **kw), want, eager


def rel(x, y):
    return ((x.double() - y).norm() / y.norm()).item()


def assert_matches(got, want, eager):
    """Each of loss, d_img, d_txt, d_tau within what fp32 allows (see the module docstring)."""
    for name, x, y, e in zip(NAMES, got, want, eager, strict=True):
        assert torch.isfinite(x).all(), name
        bound = max(FLOOR, FACTOR * rel(e, y))
        assert rel(x, y) <= bound, (name, rel(x, y), bound)


# (b, D, Q, n_valid, p, alpha, tau, divisor, splits): every b, D, alpha and tau at least once;
# Q never a multiple of the 32 / 64 blocks; full rings with wrapping positives and filling ones.
CASES = [
    (1, 16, 300, 300, 299, 0.4, 0.07, 1, None),
    (3, 64, 300, 300, 298, 0.0, 0.5, 3, 2),
    (17, 256, 300, 300, 290, 1.0, 0.001, 40, None),
    (64, 64, 1000, 1000, 970, 0.4, 0.001, 64, 5),
    (64, 256, 1000, 700, 600, 0.4, 0.07, 256, None),
    (17, 16, 1000, 60, 20, 1.0, 0.07, 17, 3),  # n_valid < one block, more splits than tiles
    (3, 256, 130, 100, 97, 0.0, 0.07, 3, 40),  # many empty splits
    (64, 16, 333, 333, 300, 1.0, 0.5, 100, 1),
    (1, 64, 333, 150, 149, 0.4, 0.5, 4, 7),
    (17, 64, 4097, 4097, 4090, 0.4, 0.07, 17, None),
]


@pytest.mark.parametrize("b,dim,q,n_valid,p,alpha,tau,divisor,splits", CASES)
def test_matches_fp64_reference(b, dim, q, n_valid, p, alpha, tau, divisor, splits):
    case = make_case(b, dim, q, n_valid, p, seed=b * 1000 + dim + q)
    assert_matches(*run_both(case, n_valid, tau, alpha, divisor, splits=splits))


def _scaled_logits(img, txt, img_m, txt_m, ring_img, ring_txt, pos, n_valid, tau, *rest, **kw):
    return msd_loss(img, txt, img_m, txt_m, ring_img, ring_txt, pos, n_valid, tau * (1 + 1e-4), *rest, **kw)


def _dropped_column(img, txt, img_m, txt_m, ring_img, ring_txt, pos, n_valid, *rest, **kw):
    return msd_loss(img, txt, img_m, txt_m, ring_img, ring_txt, pos, n_valid - 1, *rest, **kw)


@pytest.mark.parametrize("broken", [_scaled_logits, _dropped_column])
@pytest.mark.parametrize("tau", [0.001, 0.07, 0.5])
def test_the_tolerance_still_catches_a_broken_kernel(broken, tau):
    """The fp32-relative bound is no blanket: a kernel whose logits are off by 1e-4 of their
    scale, or which skips one of the 700 valid ring columns, fails it at every temperature."""
    case = make_case(64, 256, 1000, 700, 600)  # positives at rows 600..663: the last valid row is a negative
    want, eager = references(case, 700, tau, 0.4, 64)
    assert_matches(run_kernel(case, 700, tau, 0.4, 64), want, eager)
    with pytest.raises(AssertionError):
        assert_matches(run_kernel(case, 700, tau, 0.4, 64, loss_fn=broken), want, eager)


def test_block_shapes_do_not_change_the_result():
    case = make_case(17, 64, 500, 500, 490)
    want, eager = references(case, 500, 0.07, 0.4, 17)
    for block_m, block_n in ((16, 16), (64, 32), (32, 128)):
        got = run_kernel(case, 500, 0.07, 0.4, 17, block_m=block_m, block_n=block_n, splits=3)
        assert_matches(got, want, eager)


def test_every_output_element_is_written(monkeypatch):
    def poisoned(*shape, device):
        return torch.full(shape, float("nan"), device=device)


    monkeypatch.setattr(kernel, "_empty", poisoned)
    case = make_case(17, 64, 300, 300, 290)
    assert_matches(*run_both(case, 300, 0.07, 0.4, 17, splits=7))  # 7 splits over 5 tiles: 2 empty


def test_unwritten_slots_and_neighbouring_memory_are_never_read():
    b, dim, q, n_valid = 17, 64, 300, 200
    img, txt, img_m, txt_m, ring_img, ring_txt, pos = make_case(b, dim, q, n_valid, 100)
    want, eager = references((img, txt, img_m, txt_m, ring_img, ring_txt, pos), n_valid, 0.07, 0.4, b)
    # Guard bands: every tensor lives inside a NaN-filled allocation, the rings' unwritten
    # slots are NaN too; any read outside the valid data turns the result into NaN.
    def banded(t):
        buf = torch.full((t.shape[0] + 8, dim), float("nan"), device=TEST_DEVICE)
        buf[4 : 4 + t.shape[0]] = t
        return buf[4 : 4 + t.shape[0]]

    ring_img, ring_txt = banded(ring_img), banded(ring_txt)
    ring_img[n_valid:], ring_txt[n_valid:] = float("nan"), float("nan")
    case = (banded(img), banded(txt), banded(img_m), banded(txt_m), ring_img, ring_txt, pos)
    assert_matches(run_kernel(case, n_valid, 0.07, 0.4, b, splits=4), want, eager)


def test_bf16_inputs():
    """On the CPU the interpreter upcasts bf16 before its dots (its bf16 dots are wrong): the math
    is fp32 on bf16-rounded inputs, which the fp64 reference of the same inputs matches to 1e-5.
    On a GPU the dots run in bf16 (8 mantissa bits): loss and d_tau to 2e-2 there."""
    case = make_case(17, 64, 300, 300, 290, dtype=torch.bfloat16)
    got, want, _ = run_both(case, 300, 0.07, 0.4, 17, splits=2)
    assert got[1].dtype == torch.bfloat16
    tol = TOL if TEST_DEVICE == "cpu" else 2e-2
    assert rel(got[0], want[0]) <= tol and rel(got[3], want[3]) <= tol
    # The gradients are returned in the rows' dtype (bf16): compare at bf16 resolution.
    assert rel(got[1], want[1]) <= 2e-2 and rel(got[2], want[2]) <= 2e-2


def test_summed_micro_batch_gradients_equal_one_batch():
    """Exact accumulation with the kernel: micro-batches with divisor N sum to the full batch."""
    img, txt, img_m, txt_m, ring_img, ring_txt, pos = make_case(32, 64, 300, 300, 280)
    tau = torch.tensor(0.07, device=TEST_DEVICE, requires_grad=True)
    a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
    for sl in (slice(0, 8), slice(8, 24), slice(24, 32)):
        msd_loss(a[sl], b[sl], img_m[sl], txt_m[sl], ring_img, ring_txt, pos[sl], 300, tau, 0.4, 32,
                 precision="ieee").backward()
    whole_tau = torch.tensor(0.07, device=TEST_DEVICE, requires_grad=True)
    wa, wb = img.clone().requires_grad_(), txt.clone().requires_grad_()
    msd_loss(wa, wb, img_m, txt_m, ring_img, ring_txt, pos, 300, whole_tau, 0.4, 32,
             precision="ieee").backward()
    assert rel(a.grad, wa.grad) <= TOL and rel(b.grad, wb.grad) <= TOL
    assert rel(tau.grad, whole_tau.grad) <= TOL


def test_writing_a_ring_between_forward_and_backward_is_an_error():
    img, txt, img_m, txt_m, ring_img, ring_txt, pos = make_case(3, 16, 100, 100, 0)
    a = img.clone().requires_grad_()
    tau = torch.tensor(0.07, device=TEST_DEVICE)
    loss = msd_loss(a, txt, img_m, txt_m, ring_img, ring_txt, pos, 100, tau, 0.4)
    ring_txt[5] = 0.0  # an in-place write bumps the version counter
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("change,message", [
    (lambda c: {**c, "txt": c["txt"][:, :8]}, "must all be"),
    (lambda c: {**c, "img": c["img"].double()}, "one dtype"),
    (lambda c: {**c, "ring_img": c["ring_img"].half(), "ring_txt": c["ring_txt"].half()}, "one dtype"),
    (lambda c: {**c, "img_m": torch.empty(3, 16, device="meta")}, "one device"),
    (lambda c: {**c, "n_valid": 0}, "n_valid"),
    (lambda c: {**c, "n_valid": 101}, "n_valid"),
    (lambda c: {**c, "ring_txt": c["ring_txt"].t().contiguous().t()}, "contiguous"),
    (lambda c: {**c, "pos": c["pos"].float()}, "pos"),
    (lambda c: {**c, "tau": 0.07}, "tau must be a tensor"),
    (lambda c: {**c, "alpha": 1.5}, "alpha"),
    (lambda c: {**c, "block_n": 8}, "block_n must be a power of two >= 16"),
    (lambda c: {**c, "block_m": 48}, "block_m must be a power of two >= 16"),
])
def test_bad_input_is_a_value_error(change, message):
    img, txt, img_m, txt_m, ring_img, ring_txt, pos = make_case(3, 16, 100, 100, 0)
    args = dict(img=img, txt=txt, img_m=img_m, txt_m=txt_m, ring_img=ring_img, ring_txt=ring_txt,
                pos=pos, n_valid=100, tau=torch.tensor(0.07, device=TEST_DEVICE), alpha=0.4)
    with pytest.raises(ValueError, match=message):
        msd_loss(**change(args))


def test_unsupported_dim_is_a_value_error():
    img, txt, img_m, txt_m, ring_img, ring_txt, pos = make_case(2, 600, 10, 10, 0)
    with pytest.raises(ValueError, match="dim 600 not supported"):
        msd_loss(img, txt, img_m, txt_m, ring_img, ring_txt, pos, 10, torch.tensor(0.07, device=TEST_DEVICE),
                 0.4)
