"""Fused MSD loss: queue InfoNCE + momentum distillation, forward and backward in Triton.

Same value as ``fastmsd.objective.msd_loss_reference`` (KERNELS.md 1.1): per row and direction

    l_i = LSE(s_i) - alpha * W_i - (1 - alpha) * s_i,pos ,   W_i = sum_j softmax(t_i)_j s_ij

with student logits ``s = q R^T / tau`` and teacher logits ``t = q' R^T / tau`` over the ``n_valid``
ring rows, read in place. The forward streams ring tiles once per column split, keeping two
online softmaxes (student LSE; teacher normaliser and the teacher-weighted sum of student
logits), so neither the b x Q logits nor the soft targets ever reach global memory. Splits of
the columns fill the GPU at small b; their partial statistics merge in a few torch ops. The
backward recomputes both logit tiles (flash-style two-pass, KERNELS.md 3.2) and accumulates
``dq = sum_j (p_ij - alpha pi_ij) k_j`` and ``sum_j (p_ij - alpha pi_ij) s_ij`` per split; the
one-hot part, ``k_pos`` and ``s_pos``, is a gather done in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmsd.kernels.dispatch import interpreting

PRECISIONS = ("ieee", "tf32", "bf16")
MAX_DIM = 512
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Column-split partials of dq cost splits * b * D * 4 bytes per direction: keep them bounded.
_DQ_PARTIAL_BUDGET = 8 * 2**20


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter computes bf16 dots wrongly: upcast there. On a GPU, "bf16" feeds fp32
    # operands to the tensor cores as bf16; "ieee" / "tf32" pick the fp32 dot's precision.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    if a.dtype == tl.bfloat16:
        return tl.dot(a, b)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_rows(Q, QM, TAU, b, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's student and teacher rows (zeros past b and D) and 1/tau in base-2 units."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < b
    dim_ok = dims < D
    q_offs = rows.to(tl.int64)[:, None] * D + dims[None, :]
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
    qm = tl.load(QM + q_offs, mask=q_mask, other=0.0)
    c2 = 1.4426950408889634 / tl.load(TAU).to(tl.float32)  # base 2: exp2 is the fast path
    return rows, dims, row_ok, dim_ok, q_mask, q, qm, c2


@triton.jit
def _load_tile(RING, col0, end, D, dims, dim_ok, BLOCK_N: tl.constexpr):
    """Ring rows col0 .. col0 + BLOCK_N (those below ``end``) and which of them are valid."""
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < end
    # Never-written ring slots may hold anything: masked loads read zeros, never NaN.
    k = tl.load(RING + cols.to(tl.int64)[:, None] * D + dims[None, :],
                mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
    return k, col_ok


@triton.jit
def _msd_fwd_kernel(
    Q, QM, RING, TAU, STATS,
    b, n_valid, cols_per_split, D,
    HAS_TEACHER: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows, dims, row_ok, dim_ok, q_mask, q, qm, c2 = _load_rows(Q, QM, TAU, b, D, BLOCK_M, BLOCK_D)

    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    w = tl.zeros([BLOCK_M], tl.float32)
    start = split * cols_per_split
    end = tl.minimum(start + cols_per_split, n_valid)
    for col0 in range(start, end, BLOCK_N):
        k, col_ok = _load_tile(RING, col0, end, D, dims, dim_ok, BLOCK_N)
        kt = tl.trans(k)
        s2 = _dot(q, kt, PRECISION, UPCAST) * c2
        s2 = tl.where(col_ok[None, :], s2, float("-inf"))
        m_new = tl.maximum(m_s, tl.max(s2, axis=1))
        l_s = l_s * tl.exp2(m_s - m_new) + tl.sum(tl.exp2(s2 - m_new[:, None]), axis=1)
        m_s = m_new
        if HAS_TEACHER:
            t2 = _dot(qm, kt, PRECISION, UPCAST) * c2
            t2 = tl.where(col_ok[None, :], t2, float("-inf"))
            m_new = tl.maximum(m_t, tl.max(t2, axis=1))
            scale = tl.exp2(m_t - m_new)
            e = tl.exp2(t2 - m_new[:, None])
            # Masked columns: e is 0 but s2 is -inf, and 0 * -inf is NaN.
            s_nat = tl.where(col_ok[None, :], s2 * 0.6931471805599453, 0.0)
            l_t = l_t * scale + tl.sum(e, axis=1)
            w = w * scale + tl.sum(e * s_nat, axis=1)
            m_t = m_new
    out = STATS + split * b + rows
    stride = n_splits * b
    tl.store(out, m_s, mask=row_ok)
    tl.store(out + stride, l_s, mask=row_ok)
    tl.store(out + 2 * stride, m_t, mask=row_ok)
    tl.store(out + 3 * stride, l_t, mask=row_ok)
    tl.store(out + 4 * stride, w, mask=row_ok)


@triton.jit
def _msd_bwd_kernel(
    Q, QM, RING, TAU, LSE, DQ, DT,
    b, n_valid, cols_per_split, D, alpha,
    HAS_TEACHER: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    split = tl.program_id(1)
    rows, dims, row_ok, dim_ok, q_mask, q, qm, c2 = _load_rows(Q, QM, TAU, b, D, BLOCK_M, BLOCK_D)
    # Base-2 log-normalisers saved by the forward (student row 0, teacher row 1).
    lse_s2 = tl.load(LSE + rows, mask=row_ok, other=0.0)
    lse_t2 = tl.load(LSE + b + rows, mask=row_ok, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dt = tl.zeros([BLOCK_M], tl.float32)
    start = split * cols_per_split
    end = tl.minimum(start + cols_per_split, n_valid)
    for col0 in range(start, end, BLOCK_N):
        k, col_ok = _load_tile(RING, col0, end, D, dims, dim_ok, BLOCK_N)
        kt = tl.trans(k)
        s2 = _dot(q, kt, PRECISION, UPCAST) * c2
        g = tl.exp2(s2 - lse_s2[:, None])
        if HAS_TEACHER:
            t2 = _dot(qm, kt, PRECISION, UPCAST) * c2
            g = g - alpha * tl.exp2(t2 - lse_t2[:, None])
        g = tl.where(col_ok[None, :] & row_ok[:, None], g, 0.0)
        dt += tl.sum(g * s2, axis=1) * 0.6931471805599453
        if UPCAST:
            acc += tl.dot(g, k.to(tl.float32))
        elif k.dtype == tl.bfloat16:
            acc += tl.dot(g.to(tl.bfloat16), k)
        elif PRECISION == "bf16":
            acc += tl.dot(g.to(tl.bfloat16), k.to(tl.bfloat16))
        else:
            acc += tl.dot(g, k, input_precision=PRECISION)
    tl.store(DQ + (split * b + rows.to(tl.int64))[:, None] * D + dims[None, :], acc, mask=q_mask)
    tl.store(DT + split * b + rows, dt, mask=row_ok)


def _empty(*shape: int, device: torch.device) -> torch.Tensor:
    """Kernel outputs; one place, so tests can poison them and prove every element is written."""
    return torch.empty(*shape, device=device, dtype=torch.float32)


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _launch_shape(b: int, n_valid: int, device: torch.device, block_m: int, block_n: int,
                  splits: int | None, max_splits: int | None = None) -> tuple[int, int, int]:
    """(row blocks, column splits, columns per split, a multiple of block_n)."""
    row_blocks = triton.cdiv(b, block_m)
    tiles = triton.cdiv(n_valid, block_n)
    if splits is None:
        # About four programs per SM over both directions' launches; one split on the CPU.
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        splits = max(1, min(tiles, triton.cdiv(2 * sms, row_blocks)))
    splits = max(1, splits if max_splits is None else min(splits, max_splits))
    return row_blocks, splits, triton.cdiv(tiles, splits) * block_n


def _meta(alpha: float, precision: str, block_m: int, block_n: int, dim: int) -> dict:
    """The compile-time arguments both kernels share."""
    return dict(HAS_TEACHER=alpha > 0, PRECISION=precision, UPCAST=interpreting(),
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(dim))


def _validate(img, txt, img_m, txt_m, ring_img, ring_txt, pos, n_valid, tau, alpha, divisor, precision):
    rows = {"img": img, "txt": txt, "img_m": img_m, "txt_m": txt_m}
    rings = {"ring_img": ring_img, "ring_txt": ring_txt}
    tensors = {**rows, **rings, "pos": pos, "tau": tau}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    device = img.device
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton loss needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    dtypes = {t.dtype for t in (*rows.values(), *rings.values())}
    if len(dtypes) != 1 or dtypes.pop() not in (torch.float32, torch.bfloat16):
        raise ValueError(f"rows and rings must share one dtype, fp32 or bf16; got "
                         f"{[str(t.dtype) for t in (*rows.values(), *rings.values())]}")
    if img.ndim != 2 or any(t.shape != img.shape for t in rows.values()):
        raise ValueError(f"img, txt, img_m, txt_m must all be [b, D]; got "
                         f"{[tuple(t.shape) for t in rows.values()]}")
    b, dim = img.shape
    if b < 1:
        raise ValueError("empty micro-batch")
    if not 1 <= dim <= MAX_DIM:
        raise ValueError(f"embedding dim {dim} not supported (1 .. {MAX_DIM})")
    if ring_img.ndim != 2 or ring_img.shape != ring_txt.shape or ring_img.shape[1] != dim:
        raise ValueError(f"rings must both be [Q, {dim}]; got {tuple(ring_img.shape)}, "
                         f"{tuple(ring_txt.shape)}")
    if not (ring_img.is_contiguous() and ring_txt.is_contiguous()):
        raise ValueError("rings must be contiguous: the kernel reads them in place, row-major")
    if not isinstance(n_valid, int) or not 1 <= n_valid <= ring_img.shape[0]:
        raise ValueError(f"n_valid must be an int in [1, {ring_img.shape[0]}], got {n_valid!r}")
    if pos.shape != (b,) or pos.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"pos must be an integer tensor of shape ({b},), got {pos.dtype} {tuple(pos.shape)}")
    if tau.numel() != 1 or not tau.dtype.is_floating_point:
        raise ValueError("tau must be a one-element float tensor (a device pointer, no host sync)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if divisor < 1:
        raise ValueError(f"divisor must be positive, got {divisor}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


class _MSDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, img_m, txt_m, ring_img, ring_txt, pos, n_valid, tau, alpha, divisor,
                precision, block_m, block_n, splits):
        b, dim = img.shape
        device = img.device
        row_blocks, n_splits, cols = _launch_shape(b, n_valid, device, block_m, block_n, splits)
        meta = _meta(alpha, precision, block_m, block_n, dim)
        tau_f = tau.detach().reshape(()).float()
        rows = [(img, img_m, ring_txt), (txt, txt_m, ring_img)]  # image->text, text->image
        losses, lses = [], []
        for q, qm, ring in rows:
            q, qm = q.detach().contiguous(), qm.detach().contiguous()
            stats = _empty(5, n_splits, b, device=device)
            _msd_fwd_kernel[(row_blocks, n_splits)](q, qm, ring, tau_f, stats, b, n_valid, cols, dim, **meta)
            m_s, l_s, m_t, l_t, w = stats.unbind(0)
            # Merge the splits (flash-decoding rule); a split without columns has m=-inf, l=0.
            big_s = m_s.amax(0)
            lse_s2 = big_s + torch.log2((l_s * torch.exp2(m_s - big_s)).sum(0))
            s_pos = (q.float() * ring[pos].float()).sum(1) / tau_f
            loss_rows = LN2 * lse_s2 - (1.0 - alpha) * s_pos
            if alpha > 0:
                big_t = m_t.amax(0)
                scale_t = torch.exp2(m_t - big_t)
                sum_t = (l_t * scale_t).sum(0)
                lse_t2 = big_t + torch.log2(sum_t)
                loss_rows = loss_rows - alpha * (w * scale_t).sum(0) / sum_t
            else:
                lse_t2 = torch.zeros_like(lse_s2)
            losses.append(loss_rows.sum())
            lses.append(torch.stack([lse_s2, lse_t2]))
        ctx.save_for_backward(img, txt, img_m, txt_m, ring_img, ring_txt, pos, tau_f, *lses)
        ctx.args = (n_valid, alpha, divisor, precision, block_m, block_n, splits)
        ctx.tau_shape, ctx.tau_dtype = tau.shape, tau.dtype
        return (losses[0] + losses[1]) / (2 * divisor)

    @staticmethod
    def backward(ctx, grad_out):
        img, txt, img_m, txt_m, ring_img, ring_txt, pos, tau, lse_i2t, lse_t2i = ctx.saved_tensors
        n_valid, alpha, divisor, precision, block_m, block_n, splits = ctx.args
        b, dim = img.shape
        device = img.device
        row_blocks, n_splits, cols = _launch_shape(b, n_valid, device, block_m, block_n, splits,
                                                   max_splits=max(1, _DQ_PARTIAL_BUDGET // (b * dim * 4)))
        meta = _meta(alpha, precision, block_m, block_n, dim)
        # dL/ds_ij = (p_ij - y_ij) / N, halved by the mean over the two directions.
        scale = grad_out / (2 * divisor * tau)
        grads, dtau = [], torch.zeros((), device=device, dtype=torch.float32)
        for q, qm, ring, lse in ((img, img_m, ring_txt, lse_i2t), (txt, txt_m, ring_img, lse_t2i)):
            q, qm = q.detach().contiguous(), qm.detach().contiguous()
            dq = _empty(n_splits, b, dim, device=device)
            dt = _empty(n_splits, b, device=device)
            _msd_bwd_kernel[(row_blocks, n_splits)](q, qm, ring, tau, lse.contiguous(), dq, dt, b, n_valid,
                                                     cols, dim, float(alpha), **meta)
            k_pos = ring[pos].float()
            s_pos = (q.float() * k_pos).sum(1) / tau
            grads.append(((dq.sum(0) - (1.0 - alpha) * k_pos) * scale).to(q.dtype))
            dtau = dtau - scale * (dt.sum() - (1.0 - alpha) * s_pos.sum())
        dtau = dtau.reshape(ctx.tau_shape).to(ctx.tau_dtype)
        return (grads[0], grads[1], None, None, None, None, None, None, dtau,
                None, None, None, None, None, None)


def msd_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    img_m: torch.Tensor,
    txt_m: torch.Tensor,
    ring_img: torch.Tensor,
    ring_txt: torch.Tensor,
    pos: torch.Tensor,
    n_valid: int,
    tau: torch.Tensor,
    alpha: float,
    divisor: int | None = None,
    *,
    precision: str = "tf32",
    block_m: int = 32,
    block_n: int = 64,
    splits: int | None = None,
) -> torch.Tensor:
    """The fused MSD loss; same arguments and value as ``msd_loss_reference``.

    Differentiable with respect to ``img``, ``txt`` and ``tau`` (a one-element tensor, read on
    the device). ``precision`` sets the dot products: "ieee" (exact fp32), "tf32" or "bf16"
    (fp32 operands rounded for the tensor cores); bf16 rows and rings always use bf16 dots.
    ``splits`` fixes the number of column splits (default: enough programs to fill the GPU).
    """
    divisor = img.shape[0] if divisor is None else divisor
    _validate(img, txt, img_m, txt_m, ring_img, ring_txt, pos, n_valid, tau, alpha, divisor, precision)
    return _MSDLoss.apply(img, txt, img_m, txt_m, ring_img, ring_txt, pos, n_valid, tau, float(alpha),
                          divisor, precision, block_m, block_n, splits)
