"""The fused losses' GEMM: C[M, N1+N2] = scale * (A1 B1 (+ A2 B2 over a second K range)) (+ bias), fp32
accumulation, and its fixed per-shape tiling; optionally G such products in one launch (a group axis).

Two ways of reading two operand ranges without a concatenation:
- K split (forward Z): A = [x_s | x_t] along K, B1/B2 = the matching column blocks of W^T.
- N split (dW): output columns [0, N1) use B1 (x_s), [N1, N1+N2) use B2 (x_t); tiles never straddle.
Groups (hcd_loss: one group per stage): the grid's third axis picks the group; every operand has a group
stride, 0 for an operand all groups share (x_t, or a 2-D operand in general).

Why Triton GEMMs and not torch.addmm/mm: Z must come out in fp32 from 16-bit inputs (a 16-bit Z would
round the logits before the softmax), dW must accumulate and land in fp32 for a float32 weight with
16-bit activations, the K ranges / column ranges must be read from x_s and x_t without a concatenation,
and grad_output must scale the result without an extra pass; torch.mm can do none of these without
extra launches and copies. The problem sizes (B <= 1024, N <= ~8000, D <= ~2000) are small, so a plain
tiled Triton GEMM is expected to be close to cuBLAS here; bench/tile_sweep.py times the tile choices.

Operands: forward, the activation dtype (a float32 weight is rounded to it in-kernel, as autocast
would); backward, the fp32 dZ against 16-bit x / W as TF32 dots (_backward_dot). Accumulation always
fp32. For float32 activations the dots honour torch's own fp32 matmul precision (IEEE by default) like
torch.mm does.
"""
import functools

import torch
import triton
import triton.language as tl

from hcd.kernels.launch import cdiv


@triton.jit
def _accumulate(acc, a_ptr, b_ptr, rm, rn, M, N, K, sam, sak, sbk, sbn, colsum,
                DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, COLSUM: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None] * sam + rk[None, :] * sak
    b_ptrs = b_ptr + rk[:, None] * sbk + rn[None, :] * sbn
    for k0 in range(0, K, BK):
        kmask = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & (rn[None, :] < N), other=0.0)
        if COLSUM:  # row sums of A (= column sums of dZ for db), from the tile already in registers
            colsum += tl.sum(a.to(tl.float32), axis=1)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        a_ptrs += BK * sak
        b_ptrs += BK * sbk
    return acc, colsum


@triton.jit
def _gemm_kernel(a1_ptr, a2_ptr, b1_ptr, b2_ptr, c_ptr, bias_ptr, scale_ptr, colsum_ptr,
                 M, N1, N2, K1, K2, alpha,
                 sa1m, sa1k, sa2m, sa2k, sb1k, sb1n, sb2k, sb2n, scm, scn,
                 sa1g, sa2g, sb1g, sb2g, scg, sbiasg, scolg,
                 SPLIT_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                 COLSUM: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_g = tl.program_id(2)  # the group: every operand moves by its group stride (0 when shared)
    a1_ptr += pid_g * sa1g
    a2_ptr += pid_g * sa2g
    b1_ptr += pid_g * sb1g
    b2_ptr += pid_g * sb2g
    c_ptr += pid_g * scg
    bias_ptr += pid_g * sbiasg
    colsum_ptr += pid_g * scolg
    rm = pid_m * BM + tl.arange(0, BM)  # int32 offsets: _gemm checks every operand has < 2^31 elements
    tiles_1 = tl.cdiv(N1, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    colsum = tl.zeros((BM,), dtype=tl.float32)
    if SPLIT_N and pid_n >= tiles_1:
        # second column range: B2 (x_t), output columns start at N1
        rn = (pid_n - tiles_1) * BN + tl.arange(0, BN)
        acc, colsum = _accumulate(acc, a1_ptr, b2_ptr, rm, rn, M, N2, K1, sa1m, sa1k, sb2k, sb2n, colsum,
                                  DOT_DTYPE, PRECISION, False, BM, BN, BK)
        out_n = rn + N1
        n_ok = rn < N2
    else:
        rn = pid_n * BN + tl.arange(0, BN)
        acc, colsum = _accumulate(acc, a1_ptr, b1_ptr, rm, rn, M, N1, K1, sa1m, sa1k, sb1k, sb1n, colsum,
                                  DOT_DTYPE, PRECISION, COLSUM, BM, BN, BK)
        if not SPLIT_N:  # second K range (K2 may be 0): same output tile, A2 against B2
            acc, colsum = _accumulate(acc, a2_ptr, b2_ptr, rm, rn, M, N1, K2, sa2m, sa2k, sb2k, sb2n, colsum,
                                      DOT_DTYPE, PRECISION, False, BM, BN, BK)
        out_n = rn
        n_ok = rn < N1
    if HAS_SCALE:  # alpha * grad_output, the latter read on device (no host sync)
        s = tl.load(scale_ptr).to(tl.float32) * alpha
        acc = acc * s
        colsum = colsum * s
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None] * scm + out_n[None, :] * scn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & n_ok[None, :])
    if COLSUM:
        if pid_n == 0:
            tl.store(colsum_ptr + rm, colsum.to(colsum_ptr.dtype.element_ty), mask=rm < M)


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _gemm(out, a1, b1, *, a2=None, b2=None, split_n=False, bias=None, scale=None, alpha=1.0, colsum=None,
          dot_dtype=torch.float32, force_tf32=False, tile=None):
    """out = alpha * scale * (a1 @ b1 [+ a2 @ b2]) + bias, or with split_n: out = [a1 @ b1 | a1 @ b2].

    Operands are 2-D views with any strides (transposes are free), or 3-D (G, rows, cols) for G products in
    one launch (out 3-D then; a 2-D operand, bias (N,) or colsum (M,) is shared by every group).
    colsum receives scale * a1.sum(-1). tile = (BM, BN, BK, num_warps, num_stages) overrides the per-shape
    choice (bench/tile_sweep.py).
    """
    M, K1 = a1.shape[-2:]
    N1 = b1.shape[-1]
    G = out.shape[0] if out.dim() == 3 else 1
    # The kernel indexes with int32 (64-bit pointer tiles double its register use); shapes only, no sync.
    if max(t.numel() for t in (a1, b1, out) + tuple(x for x in (a2, b2) if x is not None)) >= 2 ** 31:
        raise ValueError("hcd_head: an operand has >= 2^31 elements, beyond the fused GEMM's int32 indexing")
    if split_n:
        N2, K2 = b2.shape[-1], 0
        a2 = a1
    else:
        N2 = 0
        K2 = a2.shape[-1] if a2 is not None else 0
        a2 = a2 if a2 is not None else a1
        b2 = b2 if b2 is not None else b1
    if dot_dtype == torch.float32:
        precision = "tf32" if (out.is_cuda and (force_tf32 or _tf32_allowed())) else "ieee"
    else:
        precision = "tf32"  # ignored for 16-bit operands
    BM, BN, BK, warps, stages = tile or (*_tile(M, N1, N2, dot_dtype, G), _STAGES)
    grid = (cdiv(M, BM), cdiv(N1, BN) + cdiv(N2, BN), G)
    dummy = out  # placeholder pointer for absent optional operands (never read)
    _gemm_kernel[grid](
        a1, a2, b1, b2, out, bias if bias is not None else dummy, scale if scale is not None else dummy,
        colsum if colsum is not None else dummy,
        M, N1, N2, K1, K2, float(alpha),
        *a1.stride()[-2:], *a2.stride()[-2:], *b1.stride()[-2:], *b2.stride()[-2:], *out.stride()[-2:],
        *(_group_stride(t) for t in (a1, a2, b1, b2, out)), _group_stride(bias, 2), _group_stride(colsum, 2),
        SPLIT_N=split_n, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, COLSUM=colsum is not None,
        DOT_DTYPE=_TL_DTYPE[dot_dtype], PRECISION=precision, BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
    return out


def _group_stride(t, grouped_dims=3):
    """The stride between groups: 0 for an operand every group shares (or an absent one)."""
    return t.stride(0) if t is not None and t.dim() == grouped_dims else 0


def _tf32_allowed() -> bool:
    """torch.mm's own fp32 setting. Newer torch has fp32_precision ("tf32" | "ieee" | "none"), and reading the
    legacy allow_tf32 flag raises once someone has set the new one; older torch has only allow_tf32."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def _backward_dot(act):
    """GEMM operands of the backward: the fp32 dZ against 16-bit x / W as TF32 dots. fp16 and bf16 values
    are exact in TF32 (10-bit mantissa, 8-bit exponent), so the only rounding is dZ's to TF32 (2^-11
    relative, 8x finer than bf16) at half the bf16 tensor-core rate. fp32 activations follow torch.mm's
    own TF32 setting (IEEE by default)."""
    return dict(dot_dtype=torch.float32, force_tf32=act in (torch.float16, torch.bfloat16))


# (BM, BN, BK, warps), largest first. No autotuning: its first-call benchmarking would run inside a
# training step (and inside CUDA-graph capture); these shapes are few and similar.
_TILES_16 = ((64, 128, 64, 8), (64, 64, 64, 4), (32, 64, 64, 4))
_STAGES = 3
_TILES_32 = ((64, 64, 32, 4), (32, 64, 32, 4))


@functools.lru_cache(maxsize=None)
def _tile(M, N1, N2, dot_dtype, groups=1):
    """The largest tile that still gives ~one CTA per SM of an H100 (132 SMs), counting every group's tiles;
    dX (M = B, N = D, K = nC long) would otherwise run 48 CTAs per stage at ImageNet size."""
    tiles = _TILES_32 if dot_dtype == torch.float32 else _TILES_16
    for BM, BN, BK, warps in tiles:
        if cdiv(M, BM) * (cdiv(N1, BN) + cdiv(N2, BN)) * groups >= 96:
            return BM, BN, BK, warps
    return tiles[-1]
