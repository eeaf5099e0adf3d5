"""Fused MSD loss: queue InfoNCE + momentum distillation, forward and backward in Triton.

Same value as ``fastmsd.objective.msd_loss_reference``: per row i and direction

    l_i = LSE(s_i) - alpha * W_i - (1 - alpha) * s_i,pos ,   W_i = sum_j softmax(t_i)_j s_ij

(the cross-entropy against ``y = alpha softmax(t_i) + (1 - alpha) onehot(pos_i)``, since y sums
to 1), with student logits ``s = q R^T / tau`` and teacher logits ``t = q' R^T / tau`` over the
``n_valid`` ring rows, read in place. The forward streams ring tiles once per column split,
keeping two online softmaxes (student LSE; teacher normaliser and the teacher-weighted sum of
student logits), so neither the b x Q logits nor the soft targets ever reach global memory.
Splits of the columns fill the GPU at small b; their partial statistics merge in a few torch
ops (the flash-decoding rule). The backward recomputes both logit tiles from the saved
log-normalisers (flash-style two-pass) and accumulates ``dq = sum_j (p_ij - alpha pi_ij) k_j``
and ``sum_j (p_ij - alpha pi_ij) s_ij`` per split; the one-hot part, ``k_pos`` and ``s_pos``,
is a gather done in torch. With ``g_ij = (p_ij - y_ij) / (N tau)``: ``dL/dq_i = sum_j g_ij k_j``
and ``dL/dtau = -sum_ij g_ij s_ij``.

Layout of this file: constants; the tile table per GPU architecture; the Triton kernels;
``msd_loss_forward`` / ``msd_loss_backward`` (plain functions that launch them); the thin
autograd Function; ``msd_loss``, the entry point; ``compile_for``, the ahead-of-time build the
compile gate (tests/test_kernel_compile.py, ``make kernel-gate``) checks on every architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastmsd.kernels.dispatch import interpreting
from fastmsd.kernels.gpu_compile import SHARED_MEMORY, CompiledKernel, compile_kernel

PRECISIONS = ("ieee", "tf32", "bf16")
MAX_DIM = 512
LOG2E = tl.constexpr(1.4426950408889634)  # exp2 is the fast path: logits are kept in base 2
LN2 = tl.constexpr(0.6931471805599453)
# Column-split partials of dq cost splits * b * D * 4 bytes per direction: keep them bounded.
_DQ_PARTIAL_BUDGET = 8 * 2**20
KERNELS = ("forward", "backward")


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch shape: rows and ring columns per program, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Tiles per (tile family, kernel, mode, D band), chosen by compiling each candidate for the
# family's architectures and keeping the largest that fits its shared memory without spilling
# registers; the compile gate proves every entry. Mode: the rows' dtype and the dot precision
# ("fp32-ieee", "fp32-tf32", "fp32-bf16"; bf16 rows always take bf16 dots). D band: the padded
# embedding width (BLOCK_D) at most 128, 256 or 512. Missing: nothing fits; the launcher refuses.
# Families: 86 = RTX 30 / 40 / 50 (sm_86, sm_89, sm_120), 99 KB per block; 80 = A100, 163 KB;
# 90 = H100 / H200, 227 KB, where block_m 64 lets Triton emit Hopper's wgmma.
_T = Tiles
_BANDS = (128, 256, 512)
TILES: dict[tuple[int, str, str, int], Tiles] = {
    (family, kernel, mode, band): tiles
    for family, kernel, mode, per_band in (
        # family, kernel, mode: tiles at D <= 128, <= 256, <= 512 (block_m, block_n, warps, stages)
        (86, "forward", "fp32-tf32", (_T(64, 64, 8, 2), _T(32, 32, 4, 2), _T(16, 16, 4, 2))),
        (86, "backward", "fp32-tf32", (_T(32, 32, 4, 2), _T(16, 16, 4, 2), None)),
        (86, "forward", "fp32-ieee", (_T(16, 16, 8, 2), _T(16, 16, 8, 2), None)),
        (86, "backward", "fp32-ieee", (_T(16, 16, 8, 2), _T(16, 16, 8, 2), None)),
        (86, "forward", "fp32-bf16", (_T(32, 64, 4, 2), _T(16, 32, 4, 2), None)),
        (86, "backward", "fp32-bf16", (_T(32, 32, 4, 2), _T(16, 16, 4, 1), None)),
        (86, "forward", "bf16", (_T(64, 64, 8, 2), _T(32, 64, 4, 2), _T(16, 32, 4, 2))),
        (86, "backward", "bf16", (_T(32, 32, 4, 2), _T(32, 32, 4, 2), _T(16, 32, 4, 2))),
        (80, "forward", "fp32-tf32", (_T(64, 64, 8, 2), _T(32, 64, 4, 2), _T(16, 32, 4, 2))),
        (80, "backward", "fp32-tf32", (_T(32, 32, 4, 2), _T(32, 32, 4, 2), _T(16, 16, 4, 2))),
        (80, "forward", "fp32-ieee", (_T(32, 32, 4, 2), _T(16, 16, 8, 2), None)),
        (80, "backward", "fp32-ieee", (_T(16, 16, 8, 2), _T(16, 16, 8, 2), None)),
        (80, "forward", "fp32-bf16", (_T(32, 64, 4, 2), _T(16, 32, 4, 2), _T(16, 32, 4, 2))),
        (80, "backward", "fp32-bf16", (_T(32, 32, 4, 2), _T(16, 16, 4, 1), None)),
        (80, "forward", "bf16", (_T(64, 64, 8, 2), _T(32, 64, 4, 2), _T(16, 32, 4, 2))),
        (80, "backward", "bf16", (_T(64, 64, 8, 2), _T(32, 32, 4, 2), _T(16, 32, 4, 2))),
        (90, "forward", "fp32-tf32", (_T(64, 64, 8, 3), _T(64, 32, 4, 2), _T(16, 32, 4, 2))),
        (90, "backward", "fp32-tf32", (_T(64, 64, 8, 3), _T(32, 32, 8, 2), _T(16, 16, 4, 2))),
        (90, "forward", "fp32-ieee", (_T(64, 16, 4, 2), _T(16, 16, 8, 2), None)),
        (90, "backward", "fp32-ieee", (_T(16, 16, 8, 2), _T(16, 16, 8, 2), None)),
        (90, "forward", "fp32-bf16", (_T(64, 64, 8, 3), _T(64, 64, 8, 3), _T(16, 32, 4, 2))),
        (90, "backward", "fp32-bf16", (_T(64, 64, 8, 2), _T(16, 16, 4, 1), None)),
        (90, "forward", "bf16", (_T(64, 64, 8, 3), _T(64, 64, 8, 3), _T(16, 32, 4, 2))),
        (90, "backward", "bf16", (_T(64, 64, 8, 3), _T(64, 32, 8, 2), _T(16, 32, 4, 2))),
    )
    for band, tiles in zip(_BANDS, per_band, strict=True)
    if tiles is not None
}
@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. The interpreter computes bf16 dots wrongly: upcast there. On a
    GPU, bf16 operands use the bf16 tensor cores; fp32 operands are rounded to bf16 for "bf16"
    and take ``input_precision`` for "ieee" / "tf32" (tf32: the tensor cores read the top 19 bits
    of the fp32 operands as they are, a truncation, which the tests' tolerance for the mode
    models). One branch survives compilation, so the others never see a precision they do not
    accept."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif PRECISION == "bf16" or a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


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
    c2 = LOG2E / tl.load(TAU).to(tl.float32)
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
    """Partial softmax statistics of one row block over one column split, one direction.

    Grid: (cdiv(b, BLOCK_M), n_splits); split s covers ring rows
    [s * cols_per_split, min((s + 1) * cols_per_split, n_valid)).

    Q      [b, D] student rows of this direction (fp32 or bf16, row-major), read.
    QM     [b, D] teacher rows of the same samples, same dtype; read only with HAS_TEACHER.
    RING   [>= n_valid, D] the other modality's ring, same dtype; rows below n_valid are read.
    TAU    [1] fp32 temperature, read on the device (no host sync).
    STATS  [5, n_splits, b] fp32, written: per split and row, the student running max m_s and
           sum l_s (base 2), the teacher's m_t and l_t, and w = sum_j 2^(t_j - m_t) s_j (s in
           natural units). A split with no valid column writes m = -inf, l = w = 0.
    b, n_valid, cols_per_split, D: rows, valid ring rows, columns per split, embedding width.
    """
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
            s_nat = tl.where(col_ok[None, :], s2 * LN2, 0.0)
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
    """Recomputes both logit tiles and accumulates the gradient sums of one split.

    Grid and Q, QM, RING, TAU, b, n_valid, cols_per_split, D as in ``_msd_fwd_kernel``.

    LSE    [2, b] fp32, read: the merged base-2 log-normalisers of the student (row 0) and the
           teacher (row 1) from the forward.
    DQ     [n_splits, b, D] fp32, written: sum_j (p_ij - alpha pi_ij) k_j over the split.
    DT     [n_splits, b] fp32, written: sum_j (p_ij - alpha pi_ij) s_ij (s in natural units).
    alpha  the teacher's weight in the targets (fp32).
    """
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
        dt += tl.sum(g * s2, axis=1) * LN2
        acc += _dot(g, k, PRECISION, UPCAST)
    tl.store(DQ + (split * b + rows.to(tl.int64))[:, None] * D + dims[None, :], acc, mask=q_mask)
    tl.store(DT + split * b + rows, dt, mask=row_ok)


def _empty(*shape: int, device: torch.device) -> torch.Tensor:
    """Kernel outputs; one place, so tests can poison them and prove every element is written."""
    return torch.empty(*shape, device=device, dtype=torch.float32)


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def mode_of(dtype: torch.dtype, precision: str) -> str:
    """The table's name for the rows' dtype and the dot precision."""
    return "bf16" if dtype == torch.bfloat16 else f"fp32-{precision}"


# Every mode of the table, with a (rows dtype, precision) that selects it.
MODES = {"fp32-tf32": (torch.float32, "tf32"), "fp32-ieee": (torch.float32, "ieee"),
         "fp32-bf16": (torch.float32, "bf16"), "bf16": (torch.bfloat16, "tf32")}


def tile_family(arch: int) -> int:
    """The tile table that a GPU architecture (compute capability as 86, 90, ...) uses: its own
    for the A100 and Hopper, else the consumer cards' (the smallest shared memory, 99 KB)."""
    if arch < 80:
        raise ValueError(f"the fused loss needs compute capability 8.0 or newer, not sm_{arch}: "
                         "use --loss-impl eager")
    return arch if arch in (80, 90) else 86


def tiles_for(kernel: str, arch: int, dtype: torch.dtype, precision: str, dim: int) -> Tiles:
    """The launch shape of ``kernel`` ("forward" or "backward") on ``arch``, or a ValueError
    naming the limit where no tile of that kernel fits the architecture."""
    family = tile_family(arch)
    band = next(band for band in _BANDS if _block_d(dim) <= band)
    tiles = TILES.get((family, kernel, mode_of(dtype, precision), band))
    if tiles is None:
        raise ValueError(
            f"the fused loss's {kernel} kernel does not fit sm_{arch} at D={dim} with "
            f"{mode_of(dtype, precision)} dots: every tile needs more than the "
            f"{SHARED_MEMORY[family]:,} B of shared memory per block, or spills registers; use "
            "bf16 rows and rings, a smaller D, or --loss-impl eager")
    return tiles


def device_arch(device: torch.device) -> int:
    """The compute capability as 86, 90, ...; on the CPU (the interpreter) the consumer cards'."""
    if device.type != "cuda":
        return 86
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _launch_tiles(kernel: str, img: torch.Tensor, precision: str, block_m: int | None,
                  block_n: int | None) -> Tiles:
    if interpreting():
        # Both kernels take the backward's tiles: the interpreter's dots are numpy sgemm calls,
        # which round differently for different tile shapes, and the backward must recompute
        # exactly the forward's logits (at tau = 0.001 a logit is ~1,400 in base 2, where one
        # ulp moves p by 1e-4).
        kernel = "backward"
    tiles = tiles_for(kernel, device_arch(img.device), img.dtype, precision, img.shape[1])
    return Tiles(block_m or tiles.block_m, block_n or tiles.block_n, tiles.num_warps, tiles.num_stages)


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


def _meta(has_teacher: bool, precision: str, tiles: Tiles, dim: int, upcast: bool) -> dict:
    """The compile-time arguments and launch options both kernels share."""
    return dict(HAS_TEACHER=has_teacher, PRECISION=precision, UPCAST=upcast, BLOCK_M=tiles.block_m,
                BLOCK_N=tiles.block_n, BLOCK_D=_block_d(dim), num_warps=tiles.num_warps,
                num_stages=tiles.num_stages)


def msd_loss_forward(
    img: torch.Tensor, txt: torch.Tensor, img_m: torch.Tensor, txt_m: torch.Tensor,
    ring_img: torch.Tensor, ring_txt: torch.Tensor, pos: torch.Tensor, n_valid: int,
    tau: torch.Tensor, alpha: float, divisor: int, precision: str = "tf32",
    block_m: int | None = None, block_n: int | None = None, splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss (0-d fp32); its contrastive and distillation parts ([2] fp32, summing to the loss
    up to rounding); and, for image->text and text->image, the [2, b] base-2 log-normalisers
    (student, teacher) that ``msd_loss_backward`` needs. Arguments as in ``msd_loss``, already
    validated; ``tau`` a 0-d fp32 tensor. No autograd."""
    b, dim = img.shape
    device = img.device
    tiles = _launch_tiles("forward", img, precision, block_m, block_n)
    row_blocks, n_splits, cols = _launch_shape(b, n_valid, device, tiles.block_m, tiles.block_n, splits)
    meta = _meta(alpha > 0, precision, tiles, dim, interpreting())
    losses, lses, terms = [], [], torch.zeros(2, device=device)
    for q, qm, ring in ((img, img_m, ring_txt), (txt, txt_m, ring_img)):
        q, qm = q.detach().contiguous(), qm.detach().contiguous()
        stats = _empty(5, n_splits, b, device=device)
        _msd_fwd_kernel[(row_blocks, n_splits)](q, qm, ring, tau, stats, b, n_valid, cols, dim, **meta)
        m_s, l_s, m_t, l_t, w = stats.unbind(0)
        # Merge the splits (flash-decoding rule); a split without columns has m=-inf, l=0.
        big_s = m_s.amax(0)
        lse_s2 = big_s + torch.log2((l_s * torch.exp2(m_s - big_s)).sum(0))
        s_pos = (q.float() * ring[pos].float()).sum(1) / tau
        lse_s = LN2.value * lse_s2
        loss_rows = lse_s - (1.0 - alpha) * s_pos
        terms[0] += (1.0 - alpha) * (lse_s - s_pos).sum()
        if alpha > 0:
            big_t = m_t.amax(0)
            scale_t = torch.exp2(m_t - big_t)
            sum_t = (l_t * scale_t).sum(0)
            lse_t2 = big_t + torch.log2(sum_t)
            teacher_mean = (w * scale_t).sum(0) / sum_t  # sum_j pi_ij s_ij
            loss_rows = loss_rows - alpha * teacher_mean
            terms[1] += alpha * (lse_s - teacher_mean).sum()
        else:
            lse_t2 = torch.zeros_like(lse_s2)
        losses.append(loss_rows.sum())
        lses.append(torch.stack([lse_s2, lse_t2]))
    return (losses[0] + losses[1]) / (2 * divisor), terms / (2 * divisor), lses[0], lses[1]


def msd_loss_backward(
    grad_out: torch.Tensor, img: torch.Tensor, txt: torch.Tensor, img_m: torch.Tensor,
    txt_m: torch.Tensor, ring_img: torch.Tensor, ring_txt: torch.Tensor, pos: torch.Tensor,
    n_valid: int, tau: torch.Tensor, alpha: float, divisor: int, lse_i2t: torch.Tensor,
    lse_t2i: torch.Tensor, precision: str = "tf32", block_m: int | None = None,
    block_n: int | None = None, splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for img and txt (in their dtype) and tau (0-d fp32), given the upstream
    ``grad_out`` and the forward's log-normalisers; the other arguments as in the forward."""
    b, dim = img.shape
    device = img.device
    tiles = _launch_tiles("backward", img, precision, block_m, block_n)
    row_blocks, n_splits, cols = _launch_shape(b, n_valid, device, tiles.block_m, tiles.block_n, splits,
                                               max_splits=max(1, _DQ_PARTIAL_BUDGET // (b * dim * 4)))
    meta = _meta(alpha > 0, precision, tiles, dim, interpreting())
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
    return grads[0], grads[1], dtau


def _validate(img, txt, img_m, txt_m, ring_img, ring_txt, pos, n_valid, tau, alpha, divisor, precision,
              block_m, block_n):
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
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size is not None and (size < 16 or size & (size - 1)):
            raise ValueError(f"{name} must be a power of two >= 16 (the smallest GPU dot tile), got {size}")


class MSDLossFunction(torch.autograd.Function):
    """Autograd around ``msd_loss_forward`` / ``msd_loss_backward``. The rings are saved, so an
    in-place write to one between forward and backward is autograd's usual error."""

    @staticmethod
    def forward(ctx, img, txt, img_m, txt_m, ring_img, ring_txt, pos, n_valid, tau, alpha, divisor, options):
        tau_f = tau.detach().reshape(()).float()
        loss, terms, lse_i2t, lse_t2i = msd_loss_forward(img, txt, img_m, txt_m, ring_img, ring_txt, pos,
                                                         n_valid, tau_f, alpha, divisor, **options)
        ctx.save_for_backward(img, txt, img_m, txt_m, ring_img, ring_txt, pos, tau_f, lse_i2t, lse_t2i)
        ctx.args = (n_valid, alpha, divisor, options)
        ctx.tau_shape, ctx.tau_dtype = tau.shape, tau.dtype
        ctx.mark_non_differentiable(terms)  # logged, never trained on
        return loss, terms

    @staticmethod
    def backward(ctx, grad_out, _grad_terms):
        img, txt, img_m, txt_m, ring_img, ring_txt, pos, tau, lse_i2t, lse_t2i = ctx.saved_tensors
        n_valid, alpha, divisor, options = ctx.args
        d_img, d_txt, d_tau = msd_loss_backward(grad_out, img, txt, img_m, txt_m, ring_img, ring_txt, pos,
                                                n_valid, tau, alpha, divisor, lse_i2t, lse_t2i, **options)
        d_tau = d_tau.reshape(ctx.tau_shape).to(ctx.tau_dtype)
        return d_img, d_txt, None, None, None, None, None, None, d_tau, None, None, None


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
    output_dict: bool = False,
    *,
    precision: str = "tf32",
    block_m: int | None = None,
    block_n: int | None = None,
    splits: int | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The fused MSD loss; same arguments and value as ``msd_loss_reference`` (``output_dict``
    too: the contrastive and distillation parts come from the forward's statistics).

    Differentiable with respect to ``img``, ``txt`` and ``tau`` (a one-element tensor, read on
    the device). ``precision`` sets the dot products of fp32 rows: "ieee" (exact fp32), "tf32",
    or "bf16" (operands rounded to bf16, fp32 accumulation); bf16 rows and rings always take
    bf16 dots. The tiles come from ``TILES`` for the GPU (``block_m`` / ``block_n`` override
    them: powers of two >= 16); ``splits`` fixes the number of column splits (default: enough
    programs to fill the GPU). A shape that no tile of this GPU can run is a ValueError.
    """
    divisor = img.shape[0] if divisor is None else divisor
    _validate(img, txt, img_m, txt_m, ring_img, ring_txt, pos, n_valid, tau, alpha, divisor, precision,
              block_m, block_n)
    options = dict(precision=precision, block_m=block_m, block_n=block_n, splits=splits)
    loss, terms = MSDLossFunction.apply(img, txt, img_m, txt_m, ring_img, ring_txt, pos, n_valid, tau,
                                        float(alpha), divisor, options)
    if output_dict:
        return {"loss": loss, "contrastive": terms[0], "distillation": terms[1]}
    return loss


def compile_for(arch: int, kernel: str, dtype: torch.dtype, precision: str, dim: int,
                has_teacher: bool = True) -> CompiledKernel:
    """Builds ``kernel`` for ``arch`` (e.g. 86) with no GPU present, with the tiles the launcher
    picks there and the specialisation of a typical launch: 16-byte aligned pointers, and sizes
    divisible by 16 (D only where it is). Run without TRITON_INTERPRET."""
    tiles = tiles_for(kernel, arch, dtype, precision, dim)
    rows = "*bf16" if dtype == torch.bfloat16 else "*fp32"
    if kernel == "forward":
        fn, outputs, extra = _msd_fwd_kernel, {"STATS": "*fp32"}, {}
    else:
        outputs = {"LSE": "*fp32", "DQ": "*fp32", "DT": "*fp32"}
        fn, extra = _msd_bwd_kernel, {"alpha": "fp32"}
    pointers = {"Q": rows, "QM": rows, "RING": rows, "TAU": "*fp32", **outputs}
    sizes = {"b": "i32", "n_valid": "i32", "cols_per_split": "i32", "D": "i32"}
    meta = _meta(has_teacher, precision, tiles, dim, upcast=False)
    options = {key: meta.pop(key) for key in ("num_warps", "num_stages")}
    divisible = [*pointers, "b", "n_valid", "cols_per_split", *(["D"] if dim % 16 == 0 else [])]
    return compile_kernel(fn, arch, {**pointers, **sizes, **extra}, meta, divisible, **options)
